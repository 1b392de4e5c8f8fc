"""config.toml loading: defaults, environment overrides, and one clear message per bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_shipped_config_is_valid() -> None:
    settings = load_settings(REPO / "config.toml")
    assert settings.node.ae_title == "GATEWAY"
    assert settings.node.port == 11112
    assert settings.node.data_dir == REPO / "data"
    assert settings.control_socket == REPO / "data" / "control.sock"
    assert settings.node.max_find_results == 1000


def test_environment_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[node]\nae_title = "FROMFILE"\nport = 4242\n')
    monkeypatch.setenv("GATEWAY_NODE__PORT", "5555")
    monkeypatch.setenv("GATEWAY_NODE__SHUTDOWN_GRACE", "1.5")
    settings = load_settings(config)
    assert settings.node.ae_title == "FROMFILE"
    assert settings.node.port == 5555
    assert settings.node.shutdown_grace == 1.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nprot = 104\n", "node.prot: unknown key"),
        ("[node]\nport = 70000\n", "node.port: Input should be less than or equal to 65535"),
        ('[node]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', "node.ae_title: an AE title is 1 to 16"),
        ('[node]\nduplicate_policy = "newest"\n', "node.duplicate_policy: Input should be"),
        ("[node]\nacse_timeout = -1\n", "node.acse_timeout: Input should be greater than 0"),
        (
            "[node]\nmax_find_results = -1\n",
            "node.max_find_results: Input should be greater than or equal to 0",
        ),
        (
            '[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\n',
            "peers.0.port: Field required",
        ),
        ("[node\n", "not valid TOML"),
        (
            '[[peers]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\n'
            '[[peers]]\nname = "a"\nae_title = "B"\nhost = "h"\nport = 2\n',
            "peer name 'a' is used twice",
        ),
        (
            '[[peers]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\nservices = ["query"]\n',
            "peers.0.services.0: Input should be 'echo', 'store', 'find', 'move', 'get',",
        ),
        ('[security]\ndefault_services = ["all"]\n', "security.default_services.0: Input"),
        (
            '[control]\ntcp_port = 5104\ntcp_host = "0.0.0.0"\n',
            "control.tcp_host: '0.0.0.0' is not a loopback address: a TCP control listener"
            " reachable from the network needs tls_cert and tls_key",
        ),
        (
            '[control]\ntcp_port = 5104\ntcp_host = "gateway.example.org"\n',
            "control.tcp_host: 'gateway.example.org' is not a loopback address",
        ),
        ("[node]\ntls_port = 2762\n", "node.tls_cert: a TLS listener (tls_port) needs tls_cert"),
        ("[node]\nplain = false\n", "node.plain: plain = false leaves no listener"),
        ('[node]\ntls_cert = "c.pem"\n', "node.tls_key: tls_cert and tls_key go together"),
        (
            '[[peers]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\ntls = true\n',
            "peers.0.tls: peer 'a' is reached over TLS: its certificate is verified against"
            " [node] tls_ca, which is not set",
        ),
        ('[node]\ntls_ca = "missing-ca.pem"\n', "node.tls_ca: "),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert message in str(caught.value)
    assert str(config) in str(caught.value)


def test_bad_env_override_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[node]\n")
    monkeypatch.setenv("GATEWAY_NODE__PORT", "not-a-port")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    # Named as the environment's, not the file's: the file has nothing to fix.
    assert str(caught.value).startswith(
        "environment variable GATEWAY_NODE__PORT: node.port: Input should be a valid integer"
    ), caught.value
    assert str(config) not in str(caught.value)
    monkeypatch.setenv("GATEWAY_NODE__PROT", "104")  # misspelt, with a bad file key too
    config.write_text("[node]\nae_titel = 'X'\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert f"{config}: node.ae_titel: unknown key" in message, message
    assert "environment variable GATEWAY_NODE__PROT: node.prot: unknown key" in message


def test_config_check_cli_exit_status(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[node]\nae_title = "X"\n')
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "config", "check", "--config", str(good)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout
    assert "  metrics: off" in ok.stdout.splitlines()
    good.write_text('[node]\nae_title = "X"\n[metrics]\nhost = "0.0.0.0"\nport = 9464\n')
    shown = subprocess.run(
        [sys.executable, "-m", "gateway", "config", "check", "--config", str(good)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "  metrics: http://0.0.0.0:9464/metrics" in shown.stdout.splitlines()
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = -3\n")
    for argv in (["config", "check"], ["serve"]):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *argv, "--config", str(bad)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2
        assert "node.port: Input should be greater than or equal to 0" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# -- [[rules]] and [[folders]] ---------------------------------------------------------------------

PEERS = '[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 104\n'
FOLDERS = '[[folders]]\nname = "export"\npath = "out"\n'
HOOKS = (
    '[[webhooks]]\nname = "ris"\nurl = "https://hooks.example.org/gateway"\n'
    'patient_names = true\nheaders = { Authorization = "Bearer abc" }\n'
)


def rules_toml(*rules: str) -> str:
    return PEERS + FOLDERS + HOOKS + "".join(f"[[rules]]\n{body}\n" for body in rules)


def test_rules_and_folders_load_with_defaults(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        rules_toml(
            'name = "ct"\nmatch = \'Modality == "CT"\'\ntargets = ["pacs"]',
            'name = "mr-brain"\nmatch = \'Modality == "MR"\'\nlevel = "study"\n'
            'targets = ["pacs", "export"]\nrequired_series = \'"T1" and ("T2" or "FLAIR")\'\n'
            'force_seconds = 3600\nforce_action = "discard"\npriority = "urgent"\n'
            "quiet_seconds = 90.5",
            'name = "drop-sr"\nmatch = \'Modality == "SR"\'\naction = "discard"\nenabled = false',
            'name = "tell"\nmatch = \'Modality == "US"\'\naction = "notify"\ntargets = ["ris"]',
            'name = "rest"\nmatch = \'Modality != ""\'\nfallback = true\ntargets = ["export"]',
        )
    )
    settings = load_settings(config)
    assert settings.folders[0].path == tmp_path / "out"
    assert settings.folder("export") is settings.folders[0]
    assert settings.folder("pacs") is None
    ct, mr, drop, tell, rest = settings.rules
    assert (ct.level, ct.action, ct.targets, ct.quiet_seconds) == ("series", "route", ["pacs"], 30)
    assert (ct.enabled, ct.priority, ct.fallback) == (True, "normal", False)
    assert (ct.required_series, ct.force_seconds, ct.force_action) == (None, None, "proceed")
    assert ct.expression.keywords == {"Modality"}
    assert ct.required_series_expression is None
    assert (mr.level, mr.priority, mr.quiet_seconds) == ("study", "urgent", 90.5)
    assert (mr.force_seconds, mr.force_action) == (3600, "discard")
    assert mr.required_series_expression is not None
    assert mr.required_series_expression.evaluate({"SeriesDescription": ["T1 AX", "FLAIR"]})
    assert (drop.action, drop.targets, drop.enabled) == ("discard", [], False)
    assert (tell.action, tell.targets) == ("notify", ["ris"])
    hook = settings.webhook("ris")
    assert hook is not None and settings.webhook("pacs") is None
    assert (hook.url, hook.patient_names, hook.timeout_seconds) == (
        "https://hooks.example.org/gateway",
        True,
        10.0,
    )
    assert hook.headers == {"Authorization": "Bearer abc"}
    assert rest.fallback


def test_absolute_folder_path_is_kept(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[[folders]]\nname = "x"\npath = "{tmp_path / "abs"}"\n')
    assert load_settings(config).folders[0].path == tmp_path / "abs"


def test_rules_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text(PEERS)
    monkeypatch.setenv(
        "GATEWAY_RULES", '[{"name": "ct", "match": "Modality == \\"CT\\"", "targets": ["pacs"]}]'
    )
    assert load_settings(config).rules[0].expression.evaluate({"Modality": "CT"})
    monkeypatch.setenv("GATEWAY_RULES", '[{"name": "ct", "match": "Modality ==", "targets": []}]')
    with pytest.raises(
        ConfigError, match=r"rules\.0\.match: rule 'ct': column 12: expected a value"
    ):
        load_settings(config)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            [
                'name = "brain-ct"\nmatch = \'Modality == "CT" and StudyDate ==\'\n'
                'targets = ["pacs"]'
            ],
            "rules.0.match: rule 'brain-ct': column 34: expected a value after '=='",
        ),
        (
            [
                'name = "ok"\nmatch = \'Modality == "CT"\'\ntargets = ["pacs"]',
                'name = "typo"\nmatch = \'Modalty == "CT"\'\ntargets = ["pacs"]',
            ],
            "rules.1.match: rule 'typo': column 1: unknown attribute 'Modalty': did you mean",
        ),
        (
            ['name = "x"\nmatch = \'Modality == "CT"\'\ntargets = ["pacs", "archive"]'],
            "rules.0.targets: rule 'x': unknown target 'archive': not the name of a [[peers]] or"
            " [[folders]] entry (known: pacs, export)",
        ),
        (
            ['name = "x"\nmatch = \'Modality == "SR"\'\naction = "discard"\ntargets = ["pacs"]'],
            "rules.0.targets: rule 'x': action \"discard\" sends nothing: remove its targets",
        ),
        (
            ['name = "x"\nmatch = \'Modality == "CT"\''],
            "rules.0.targets: rule 'x': action \"route\" needs at least one target",
        ),
        (
            ['name = "x"\nmatch = \'Modality == "CT"\'\ntargets = ["pacs", "pacs"]'],
            "rules.0.targets: rule 'x': target 'pacs' is listed twice",
        ),
        (
            [
                'name = "x"\nmatch = \'Modality == "MR"\'\ntargets = ["pacs"]\n'
                "required_series = '\"T1\"'"
            ],
            "rules.0.required_series: rule 'x': required_series needs level = \"study\"",
        ),
        (
            [
                'name = "x"\nmatch = \'Modality == "MR"\'\ntargets = ["pacs"]\nlevel = "study"\n'
                'required_series = \'"T1" and ("T2" or FLAIR)\''
            ],
            "rules.0.required_series: rule 'x': column 19: expected a quoted series description,"
            " found 'FLAIR'",
        ),
        (
            ['name = "x"\nmatch = \'Modality == "MR"\'\ntargets = ["pacs"]\nforce_seconds = 60'],
            "rules.0.force_seconds: rule 'x': force_seconds needs level = \"study\"",
        ),
        (
            [
                'name = "x"\nmatch = \'Modality == "MR"\'\ntargets = ["pacs"]\nlevel = "study"\n'
                'force_action = "discard"'
            ],
            "rules.0.force_action: rule 'x': force_action needs force_seconds",
        ),
        (
            [
                'name = "x"\nmatch = \'Modality == "MR"\'\ntargets = ["pacs"]\nlevel = "study"\n'
                "force_seconds = 0"
            ],
            "rules.0.force_seconds: Input should be greater than 0",
        ),
        (
            ['name = "x"\nmatch = \'Modality == "US"\'\naction = "notify"'],
            "rules.0.targets: rule 'x': action \"notify\" needs at least one target",
        ),
        (
            ['name = "x"\nmatch = \'Modality == "US"\'\naction = "notify"\ntargets = ["pacs"]'],
            "rules.0.targets: rule 'x': unknown target 'pacs': not the name of a [[webhooks]]"
            " entry (known: ris)",
        ),
        (
            ['name = "x"\nmatch = \'Modality == "US"\'\ntargets = ["ris"]'],
            "rules.0.targets: rule 'x': unknown target 'ris': not the name of a [[peers]] or"
            " [[folders]] entry (known: pacs, export)",
        ),
        (
            ['name = "x"\nmatch = \'Modality == "US"\'\ntargets = ["pacs"]\nlevel = "patient"'],
            "rules.0.level: Input should be 'series' or 'study'",
        ),
        (
            ['name = "x"\nmatch = \'Modality == "US"\'\ntargets = ["pacs"]\npriority = "high"'],
            "rules.0.priority: Input should be 'urgent', 'normal' or 'low'",
        ),
        (
            ['name = "x"\nmatch = \'Modality == "US"\'\ntargets = ["pacs"]\nquiet_seconds = 0'],
            "rules.0.quiet_seconds: Input should be greater than 0",
        ),
        (
            ['name = "x"\nmatch = \'Modality == "US"\'\ntargets = ["pacs"]\nlevle = "study"'],
            "rules.0.levle: unknown key",
        ),
        (
            ['match = \'Modality == "US"\'\ntargets = ["pacs"]'],
            "rules.0.name: Field required",
        ),
        (
            [
                'name = "x"\nmatch = \'Modality == "CT"\'\ntargets = ["pacs"]',
                'name = "x"\nmatch = \'Modality == "MR"\'\ntargets = ["pacs"]',
            ],
            "rules.1.name: rule name 'x' is used twice",
        ),
    ],
)
def test_bad_rule_names_the_rule_and_the_key(
    tmp_path: Path, rules: list[str], message: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(rules_toml(*rules))
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert f"{config}: {message}" in str(caught.value)
    assert "(got {" not in str(caught.value)  # the whole input is never echoed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            PEERS + '[[folders]]\nname = "pacs"\npath = "x"\n',
            "folders.0.name: folder name 'pacs' is already the name of a peer",
        ),
        (FOLDERS + FOLDERS, "folders.1.name: folder name 'export' is already the name of a folder"),
        ('[[folders]]\nname = "x"\npath = ""\n', "folders.0.path: a folder path cannot be empty"),
        ('[[folders]]\nname = "x y"\npath = "p"\n', "folders.0.name: String should match pattern"),
        ('[[folders]]\nname = "x"\n', "folders.0.path: Field required"),
        (PEERS + PEERS, "peers.1.name: peer name 'pacs' is used twice"),
        (
            PEERS + '[[webhooks]]\nname = "pacs"\nurl = "http://h/x"\n',
            "webhooks.0.name: webhook name 'pacs' is already the name of a peer",
        ),
        (
            '[[webhooks]]\nname = "w"\nurl = "ftp://h/x"\n',
            "webhooks.0.url: must be an http:// or https:// URL (got 'ftp://h/x')",
        ),
        (
            '[[webhooks]]\nname = "w"\nurl = "http://h:99999/x"\n',
            "webhooks.0.url: must be an http:// or https:// URL",
        ),
        (
            '[[webhooks]]\nname = "w"\nurl = "http://h/x"\nheaders = { "a b" = "c" }\n',
            "webhooks.0.headers: 'a b' is not an HTTP header name",
        ),
        (
            '[[webhooks]]\nname = "w"\nurl = "http://h/x"\nheaders = { X = "a\\nb" }\n',
            "webhooks.0.headers: the value of header 'X' holds a control character",
        ),
        ('[[webhooks]]\nname = "w"\n', "webhooks.0.url: Field required"),
        (
            PEERS + '[retrieve]\nprimary = "vna"\n',
            "retrieve.primary: 'vna' is not the name of a [[peers]] entry (known: pacs)",
        ),
        (
            PEERS + '[retrieve]\nsecondary = "pacs"\n',
            "retrieve.secondary: a secondary archive needs a primary one",
        ),
        (
            '[retrieve]\ntimezone = "Mars/Olympus"\n',
            "retrieve.timezone: unknown time zone 'Mars/Olympus'",
        ),
        (
            '[retrieve]\nsecondary_windows = [{ days = ["mon"], start = "7pm" }]\n',
            "retrieve.secondary_windows.0.start: '7pm' is not a time of day as HH:MM",
        ),
        (
            PEERS + '[[projects]]\nname = "p"\nanonymiser = "anon"\n',
            "projects.0.anonymiser: 'anon' is not the name of a [[peers]] entry (known: pacs)",
        ),
        (
            '[[projects]]\nname = "p"\n[[projects]]\nname = "p"\n',
            "projects.1.name: project name 'p' is used twice",
        ),
    ],
)
def test_bad_folder_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert f"{config}: {message}" in str(caught.value)


def test_folder_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    config = tmp_path / "config.toml"
    config.write_text('[[folders]]\nname = "x"\npath = "taken"\n')
    with pytest.raises(ConfigError, match=r"folders\.0\.path: .*taken is not a directory"):
        load_settings(config)


def test_rule_expression_over_lines_stays_on_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        rules_toml(
            "name = \"x\"\nmatch = '''Modality == \"CT\"\nand \"oops\nstill'''\ntargets = []"
        )
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "rules.0.match: rule 'x': column 22: unterminated string" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_config_check_refuses_a_bad_rule_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        rules_toml('name = "brain-ct"\nmatch = \'Modality = "CT"\'\ntargets = ["pacs"]')
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"gateway: {config}: rules.0.match: rule 'brain-ct': column 10: unexpected character"
        " '=': compare with '=='\n"
    )
    config.write_text(rules_toml('name = "ct"\nmatch = \'Modality == "CT"\'\ntargets = ["pacs"]'))
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "  folders: export\n  rules: ct\n" in ok.stdout


@pytest.mark.parametrize("argv", [["config", "check"], ["serve"]])
def test_a_regex_only_backtracking_can_run_is_refused_at_load(
    tmp_path: Path, argv: list[str]
) -> None:
    """RE2 refuses a backreference: `config check` and `serve` exit 2 with one line naming the
    rule, its key and RE2's reason (rules reload: tests/test_routing.py)."""
    config = tmp_path / "config.toml"
    config.write_text(rules_toml(
        'name = "repeats"\nmatch = \'SeriesDescription matches "(T1)\\1"\'\ntargets = ["pacs"]'
    ))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "gateway", *argv, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"gateway: {config}: rules.0.match: rule 'repeats': column 27: invalid regular"
        ' expression "(T1)\\1": invalid escape sequence: \\1\n'
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_a_loopback_tcp_control_listener_needs_no_tls(tmp_path: Path, host: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[control]\ntcp_port = 5104\ntcp_host = "{host}"\n')
    assert load_settings(config).control.tcp_host == host
