"""HF checkpoint interop: each family's adapter maps its state dict and config to and from HF's."""
