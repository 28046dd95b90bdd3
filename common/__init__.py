"""What serving, training, export and the load tests share, beside the model contract: decoding and
preprocessing an image as a contract describes (``imaging``), the one ONNX Runtime session wrapper
(``runtime``), class scores (``scores``), writing a file atomically (``files``), what the machine
grants a process (``resources``: cores, memory limit, resident memory) and the synthetic scenes
(``scenes``).

numpy, Pillow and ONNX Runtime only: no torch, no BentoML, and nothing from ``services``,
``training``, ``export`` or ``loadtest`` (tests/test_structure.py checks it), so serving and the
load generator's image ship it without the training stack."""
