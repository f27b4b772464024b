"""titan_mm: a minimal native-PyTorch trainer for multimodal models."""
