"""One module per CLI command (`train`, `grpo`, `nft`, `eval`, `env`), each runnable as
`python -m trl_diffusion_opd.scripts.<command>` and as `trl-diffusion-opd <command>`; `utils` holds what they share.
Plug-ins add commands through `trl_diffusion_opd.registry.register_command` (the tiny world's `world`)."""
