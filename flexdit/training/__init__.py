"""Training: data sources, latent extraction and the FlexDiT fine-tuning loop."""
