"""The arithmetic: the Trainer, the chunk protocol and its runners, evaluation, export. No Prefect."""
