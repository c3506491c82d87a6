"""Celery worker side of draftloop: the app, its beat schedule, the tasks and the drafter trainers."""
