"""Site configuration: defaults, the shipped example, and every kind of mistake an admin can make."""
from pathlib import Path

import pytest

from spank_sif import config
from spank_sif.config import SiteConfig, load_config, parse_config
from spank_sif.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "slurm-config" / "spank_sif.yaml"


def settings(cfg: SiteConfig) -> SiteConfig:
    """The settings alone: where they came from (``source``) set aside."""
    return cfg._replace(source=SiteConfig().source)


def test_shipped_example_equals_the_defaults():
    # The example documents the defaults; it must never drift from them.
    assert settings(load_config(str(EXAMPLE))) == SiteConfig()


def test_missing_default_file_means_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.yaml"))
    assert load_config() == SiteConfig()


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="absent.yaml: site configuration file not found"):
        load_config(str(tmp_path / "absent.yaml"))


def test_empty_file_means_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("# nothing set\n")
    cfg = load_config(str(p))
    assert settings(cfg) == SiteConfig() and cfg.source == str(p)


def test_values_are_applied_and_normalised():
    cfg = parse_config("""
mount_point: /scratch/../sif-root/
key_variables: [SITE_PASSPHRASE, APPTAINER_ENCRYPTION_PEM_PATH]
strip_key_variables: false
allowed_image_paths: [/project, /apps/images/]
allow_unencrypted: false
kdf_max_memory_kib: 65536
kdf_max_time_cost: 8
kdf_max_threads: 2
kdf_max_pbkdf2_iterations: 2000000
kdf_max_parallel: 2
kdf_lock_timeout: 60
state_dir: /run/sif-state
log_level: debug
kernel_mount: root-owned
""")
    assert cfg.mount_point == "/sif-root"
    assert cfg.key_variables == ("SITE_PASSPHRASE", "APPTAINER_ENCRYPTION_PEM_PATH")
    assert cfg.allowed_image_paths == ("/project", "/apps/images")
    assert (cfg.strip_key_variables, cfg.allow_unencrypted) == (False, False)
    assert (cfg.kdf_max_memory_kib, cfg.kdf_max_parallel) == (65536, 2)
    assert (cfg.kdf_max_time_cost, cfg.kdf_max_threads, cfg.kdf_max_pbkdf2_iterations) == (8, 2, 2000000)
    assert cfg.kdf_lock_timeout == 60
    assert (cfg.state_dir, cfg.log_level, cfg.kernel_mount) == ("/run/sif-state", "debug", "root-owned")


BAD = [
    ("mount_pont: /sif", "unknown key 'mount_pont'"),
    ("mount_point: sif", "'mount_point' must be an absolute path"),
    ("mount_point: /", "'mount_point' cannot be '/'"),
    ("mount_point: 7", "'mount_point' must be a string, got int"),
    ("strip_key_variables: 'no'", "'strip_key_variables' must be true or false, got str"),
    ("allow_unencrypted: 1", "'allow_unencrypted' must be true or false, got int"),
    ("kdf_max_memory_kib: yes", "'kdf_max_memory_kib' must be a whole number, got bool"),
    ("kdf_max_memory_kib: 1.5", "'kdf_max_memory_kib' must be a whole number, got float"),
    ("kdf_max_memory_kib: 0", "'kdf_max_memory_kib' must be at least 1"),
    ("kdf_max_parallel: -3", "'kdf_max_parallel' must be at least 1"),
    ("kdf_max_time_cost: 0", "'kdf_max_time_cost' must be at least 1"),
    ("kdf_max_threads: four", "'kdf_max_threads' must be a whole number, got str"),
    ("kdf_max_pbkdf2_iterations: 1e6", "'kdf_max_pbkdf2_iterations' must be a whole number, got str"),
    ("kdf_lock_timeout: 0", "'kdf_lock_timeout' must be at least 1"),
    ("key_variables: APPTAINER_ENCRYPTION_PASSPHRASE", "'key_variables' must be a list"),
    ("key_variables: []", "'key_variables' must name at least one variable"),
    ("key_variables: [MY_KEY]", "entry 'MY_KEY' must be a variable name ending in"),
    ("key_variables: ['A B_PASSPHRASE']", "entry 'A B_PASSPHRASE' must be a variable name"),
    ("key_variables: [3]", "'key_variables' must be a list of strings"),
    ("allowed_image_paths: /project", "'allowed_image_paths' must be a list of absolute directories"),
    ("allowed_image_paths: [project]", "'allowed_image_paths' must be an absolute path"),
    ("state_dir: run/x", "'state_dir' must be an absolute path"),
    ("log_level: loud", "'log_level' must be one of error, info, verbose, debug"),
    ("kernel_mount: sometimes", "'kernel_mount' must be one of always, encrypted-only, root-owned"),
    ("kernel_mount: true", "'kernel_mount' must be a string, got bool True"),
    ("- a\n- b", "must be a mapping of settings, got list"),
    ("mount_point: [unclosed", "not valid YAML at line 2"),
    ("a: b: c", "not valid YAML at line 1"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[b[1][:40] for b in BAD])
def test_mistakes_name_the_file_and_the_key(tmp_path, text, message):
    p = tmp_path / "site.yaml"
    p.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(p))
    assert str(err.value).startswith(f"{p}: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the site configuration"):
        load_config(str(tmp_path))  # a directory


def test_not_utf8_is_a_config_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"mount_point: /\xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read the site configuration"):
        load_config(str(p))


def test_every_setting_has_a_check():
    assert set(SiteConfig._fields) - {"source"} == set(config._CHECKS)


@pytest.mark.parametrize("text", ["allow_unencrypted: false\nmount_point: /x\nallow_unencrypted: true\n",
                                  "mount_point: /x\nmount_point: /y\n"])
def test_a_key_set_twice_is_an_error_not_the_last_one_winning(text):
    with pytest.raises(ConfigError, match="is set twice .line 3|is set twice .line 2"):
        config.parse_config(text, "site.yaml")


def test_kernel_mount_defaults_to_encrypted_only_and_messages_name_the_setting(tmp_path):
    assert SiteConfig().kernel_mount == "encrypted-only"
    assert SiteConfig().setting("mount_point") == "'mount_point' in /etc/slurm/spank_sif.yaml"
    p = tmp_path / "site.yaml"
    p.write_text("mount_point: /sif\n")
    assert load_config(str(p)).setting("mount_point") == f"'mount_point' in {p}"
