"""The lab: real pretrained parts (assets, towers), the CPU demo, the lens, the benchmark, the tiny model."""
