"""kvfuse benchmarks (`kvfuse bench ...`): model shapes with random weights, synthetic stores,
TTFT and serving runs. Results are committed under bench/results/."""
