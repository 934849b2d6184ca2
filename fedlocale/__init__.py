"""fedlocale: federated LoRA fine-tuning across regions whose data may not leave them."""

__version__ = "0.1.0"
