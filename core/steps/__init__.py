"""The pass specs: what each step is called, takes, makes, needs and is configured with, one module per
step. The API plans jobs over them (core.recipes); the worker's passes implement them (worker.passes).
Importing this package imports no pass implementation and no heavy library; core.steps.registry has
them all."""
