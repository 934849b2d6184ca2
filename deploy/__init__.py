"""Per-country deployment: certificates, the exact Flower commands, and a launcher for one machine."""
