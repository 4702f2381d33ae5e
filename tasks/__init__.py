"""trainflow's Prefect tasks and the plain functions they wrap."""
