"""Voice logic every face shares: endpointing, "text chunks → sentences → audio"."""
