"""fedlocale client: the Flower ClientApp that trains and evaluates on one region's own data."""
