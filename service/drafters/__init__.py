"""Drafters: one module per kind, all behind `service.drafters.base.Drafter`."""
