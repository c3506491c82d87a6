"""The drafter trainers, split by job: `config` (torch-free), `data`, `features`,
`losses`, `evaluate`, `loop`, `rollouts`, then the two trainers `sft` (the
cold start) and `opd` (Draft-OPD updates), and `cli` (`draftloop train-sft`).
See docs/architecture.md."""
