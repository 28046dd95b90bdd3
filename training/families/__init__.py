"""One module per model family: config dataclass, nn.Module(s), and the family's serving contract."""
