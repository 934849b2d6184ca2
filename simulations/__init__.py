"""fedlocale simulations: demo data, in-process simulation with baselines, reports and benchmarks."""
