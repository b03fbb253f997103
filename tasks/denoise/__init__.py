"""Time-series denoising (OptNet) and the TV backend benchmark."""
