# A package, so that its conftest is imported as gpu.conftest: tests elsewhere import tests/conftest.py as `conftest`.
