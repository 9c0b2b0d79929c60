"""Checkpoint conversion (released safetensors -> Orbax). Not implemented yet: see the issue tracker."""
