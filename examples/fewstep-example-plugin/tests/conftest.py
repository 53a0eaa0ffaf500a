# The fewstep conformance suite as a pytest plugin: fixtures fewstep_registry and fewstep_conformance.
pytest_plugins = ["core.testing"]
