"""Parallelisms applied from outside the model code: device mesh, FSDP2, compile, activation checkpointing."""
