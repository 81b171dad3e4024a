"""Shared test fixtures. The VM harness (tests/vm/) runs @pytest.mark.vm tests under a kernel with dm-crypt
and provides the ``ref_images`` fixture; strict mode (tests/strict_mode.py) turns skips into failures
under scripts/test.sh. See docs/testing.md."""
pytest_plugins = ["vm.plugin", "strict_mode"]
