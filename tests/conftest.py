"""Shared test fixtures. The VM harness (tests/vm/) runs @pytest.mark.vm tests under a kernel with dm-crypt
and provides the ``ref_images`` fixture; see docs/testing.md."""
pytest_plugins = ["vm.plugin"]
