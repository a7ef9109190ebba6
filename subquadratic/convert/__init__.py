"""Converters from other libraries' checkpoints to `subquadratic` models (each module also has a console command)."""
