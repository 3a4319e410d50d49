"""One module per pass, each implementing its spec from core.steps; worker.passes.registry lists them.
This package imports nothing, so importing one pass (or base) runs no other pass module."""
