"""Tools around the product: benchmarks, the default head's builder, the tests' tiny model."""
