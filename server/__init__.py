"""fedlocale server: the Flower ServerApp that combines the regions' adapters."""
