"""AiiDA plugin that turns an aiida-kkr impurity database into machine-learning results with full provenance."""

__version__ = '0.1.0'
