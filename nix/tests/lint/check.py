#!/usr/bin/env python3
"""Checks the NixOS VM test scripts without nixpkgs (run by scripts/check-vm-tests).

For each nix/tests/vm-*.nix:
  1. evaluates, with nix-instantiate and stub arguments (nothing from nixpkgs is forced),
     the test's `name`, its node names and the exact `testScript` string the driver runs;
  2. lints that string with ruff, the driver's globals declared as builtins: the symbols
     nixpkgs' driver.py `test_symbols()` exports, one per node, `vlan1`;
  3. type-checks it with mypy the way nixpkgs' build does (driver type stub + one
     `<node>: Machine` line per node, `--no-implicit-optional`);
  4. checks consistency with the Nix side: every node is used; hosts looked up by name are
     nodes; each port constant matches the option/file it names; every unit a node waits
     for or restarts exists on that node (from its roles in nix/modules, its own
     systemd.services / oci-containers, or the nixpkgs services our modules enable); the
     files and commands the scripts use are provided by the test's Nix files.
Exit status 0 only if everything passes.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
TESTS = ROOT / "nix" / "tests"
MODULES = ROOT / "nix" / "modules"

# Globals the driver puts in the script's namespace besides the nodes and `vlanN`
# (nixpkgs nixos/lib/test-driver/src/test_driver/driver.py, `test_symbols`, NixOS/nixpkgs
# 003d5816).
DRIVER_SYMBOLS = [
    "start_all", "test_script", "machines_qemu", "machines_nspawn", "vlans", "driver",
    "log", "os", "create_machine", "subtest", "run_tests", "join_all", "retry",
    "serial_stdout_off", "serial_stdout_on", "polling_condition", "BaseMachine", "t",
    "debug",
]  # fmt: skip
# Every node sits on the default VLAN 1 (no test sets virtualisation.vlans).
VLANS = ["vlan1"]

RUFF_SELECT = "F,E,W,B,UP,PLE"

# Where each port constant of common.py comes from: (file, regex whose group 1 is the port).
PORT_SOURCES = {
    "HTTP_PORT": (
        "nix/modules/firewall.nix",
        r"allowedTCPPorts = lib\.mkIf localProxy \[(\d+) \d+\]",
    ),
    "HTTPS_PORT": (
        "nix/modules/firewall.nix",
        r"allowedTCPPorts = lib\.mkIf localProxy \[\d+ (\d+)\]",
    ),
    "APP_PORT": (
        "nix/modules/default.nix",
        r"appPort = mkOption \{\s*type = types\.port;\s*default = (\d+);",
    ),
    "PG_PORT": (
        "nix/modules/default.nix",
        r"port = mkOption \{\s*type = types\.port;\s*default = (\d+);"
        r"\s*description = \"PostgreSQL",
    ),
    "AMQP_PORT": (
        "nix/modules/default.nix",
        r"port = mkOption \{\s*type = types\.port;\s*default = (\d+);\s*description = \"AMQP",
    ),
    "WORKER_METRICS_PORT": (
        "nix/modules/default.nix",
        r"PAGEVIEWS_METRICS_LISTEN = mkOption \{[^}]*default = \"127\.0\.0\.1:(\d+)\";",
    ),
    "IMAGE_WORKER_METRICS_PORT": (
        "nix/images.nix",
        r"\"PAGEVIEWS_METRICS_LISTEN=0\.0\.0\.0:(\d+)\"",
    ),
}
# Ports nixpkgs' own modules fix (not set by ours): the value and why.
NIXPKGS_PORTS = {
    "EPMD_PORT": (4369, "services.epmd, enabled by services.rabbitmq (nixpkgs rabbitmq.nix)"),
    "ERLANG_DIST_PORT": (25672, "RabbitMQ's inter-node port, AMQP port + 20000"),
}
OTHER_CONSTANTS = {
    # constant: (file, regex whose group 1 is the value)
    "SECURITY_THRESHOLD": ("scripts/systemd-score", r"threshold=\"\$\{THRESHOLD:-(\d+)\}\""),
    "DOMAIN": ("nix/tests/tls.nix", r"domain = \"([^\"]+)\";"),
}

# Units of nixpkgs services that our modules enable: unit -> (role, file of ours, needle).
NIXPKGS_UNITS = {
    "postgresql.service": ("data", "data.nix", "services.postgresql = {\n      enable = true;"),
    "postgresql.target": ("data", "data.nix", "services.postgresql = {\n      enable = true;"),
    "postgresql-setup.service": ("data", "data.nix", "systemd.services.postgresql-setup"),
    "rabbitmq.service": ("data", "data.nix", "services.rabbitmq = {\n      enable = true;"),
    "nginx.service": ("proxy", "proxy.nix", "services.nginx = {\n      enable = true;"),
}
GENERIC_UNITS = {"multi-user.target", "network-online.target", "network.target"}
UNIT_RE = re.compile(r"\b([A-Za-z0-9@_.-]+\.(?:service|target|socket|timer))\b")
ROLES = ("proxy", "app", "data")

failures: list[str] = []
warnings: list[str] = []


def fail(msg: str) -> None:
    failures.append(msg)
    print(f"FAIL {msg}")


def ok(msg: str) -> None:
    print(f"ok   {msg}")


def nix_eval(expr: str) -> object:
    out = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "-E", expr],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(out.stdout)


def evaluate_test(nix_file: Path) -> dict:
    # Stub arguments: the test only names them lazily, so none is forced when reading
    # the name, the node names and the script.
    expr = f"""
      let
        stub = throw "not available without nixpkgs";
        t = import {nix_file} {{
          pkgs = stub; module = stub; package = stub; images = stub; tls = stub; secrets = stub;
        }};
      in {{ inherit (t) name testScript; nodes = builtins.attrNames t.nodes; }}
    """
    return nix_eval(expr)  # type: ignore[return-value]


def parsed(path: Path) -> str:
    """The file as `nix-instantiate --parse` prints it: comments gone, one line."""
    return subprocess.run(
        ["nix-instantiate", "--parse", str(path)], check=True, capture_output=True, text=True
    ).stdout


def attr_block(text: str, start: int) -> str:
    """The `{ ... }` starting at or after index `start` (strings are "..." in parse output)."""
    i = text.index("{", start)
    depth, j, in_str = 0, i, False
    while j < len(text):
        c = text[j]
        if in_str:
            if c == "\\":
                j += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i : j + 1]
        j += 1
    raise ValueError("unbalanced braces")


def top_level_keys(block: str) -> list[str]:
    """Attribute names at depth 1 of a `{ a = ...; b.c = ...; }` block."""
    keys, depth, in_str, i = [], 0, False, 0
    expect_key = True
    while i < len(block):
        c = block[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{([":
            depth += 1
            if depth == 1 and c == "{":
                expect_key = True
        elif c in "})]":
            depth -= 1
        elif c == ";" and depth == 1:
            expect_key = True
        elif depth == 1 and expect_key and not c.isspace():
            m = re.match(r'(?:inherit\b[^;]*)|"?([A-Za-z_][\w\'-]*)"?', block[i:])
            if m and m.group(1):
                keys.append(m.group(1))
            expect_key = False
        i += 1
    return keys


def value_block(block: str, key: str) -> str | None:
    """The `{ ... }` value of attribute `key` at depth 1 of `block`, if it is one."""
    depth, in_str, i = 0, False, 0
    while i < len(block):
        c = block[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{([":
            depth += 1
        elif c in "})]":
            depth -= 1
        elif depth == 1 and block.startswith(f"{key} = {{", i) and block[i - 1] in " {;":
            return attr_block(block, i)
        i += 1
    return None


def blocks_at(text: str, path: list[str]) -> list[str]:
    """Every `{ ... }` reached by the attribute path (parse output nests `a.b = x` as
    `a = { b = x; }`)."""
    found = []
    for m in re.finditer(rf"(?<=[{{;] ){re.escape(path[0])} = \{{", text):
        block: str | None = attr_block(text, m.start())
        for key in path[1:]:
            block = value_block(block, key) if block else None
        if block:
            found.append(block)
    return found


def services_defined(text: str) -> set[str]:
    """systemd.services and systemd.sockets names defined in parse output, as unit names."""
    units: set[str] = set()
    for kind, suffix in (("services", "service"), ("sockets", "socket")):
        for block in blocks_at(text, ["systemd", kind]):
            units.update(f"{n}.{suffix}" for n in top_level_keys(block))
    return units


def module_units_by_role() -> dict[str, set[str]]:
    units: dict[str, set[str]] = {r: set() for r in ROLES}
    for path in sorted(MODULES.glob("*.nix")):
        src = path.read_text()
        m = re.search(r"config = lib\.mkIf \(cfg\.enable && common\.local(\w+)\)", src)
        roles = [m.group(1).lower()] if m else ["app", "data"]  # default.nix: secrets
        for unit in services_defined(parsed(path)):
            for role in roles:
                units[role].add(unit)
    for unit, (role, file, needle) in NIXPKGS_UNITS.items():
        if needle in (MODULES / file).read_text():
            units[role].add(unit)
        else:
            fail(f"{unit}: nix/modules/{file} no longer enables its nixpkgs service")
    return units


def node_roles_and_units(nix_file: Path, nodes: list[str], by_role: dict[str, set[str]]):
    """Per node: the pageviews roles it runs and the units it has."""
    text = parsed(nix_file)
    nodes_block = attr_block(text, text.index("nodes = "))
    result: dict[str, tuple[set[str], set[str]]] = {}
    # roles: `(pageviews [ "x" ])` (vm-split's helper), `roles = [ ... ]`, or the module
    # imported with services.pageviews set but no roles (= all three)
    for node in nodes:
        m = re.search(rf"\b{re.escape(node)} = ", nodes_block)
        assert m, node
        rest = nodes_block[m.end() :]
        # the node's own definition runs to the next top-level `;` of the nodes block
        depth, end, in_str = 0, len(rest), False
        for i, c in enumerate(rest):
            if in_str:
                if c == '"' and rest[i - 1] != "\\":
                    in_str = False
                continue
            if c == '"':
                in_str = True
            elif c in "{([":
                depth += 1
            elif c in "})]":
                depth -= 1
            elif c == ";" and depth == 0:
                end = i
                break
        body = rest[:end]
        roles: set[str] = set()
        for call in re.findall(r"\(pageviews \[ ([^\]]*)\]\)", body):
            roles.update(re.findall(r'"(\w+)"', call))
        m_roles = re.search(r"roles = \[ ([^\]]*)\]", body)
        if m_roles:
            roles.update(re.findall(r'"(\w+)"', m_roles.group(1)))
        for block in blocks_at(body, ["services", "pageviews"]):
            if "enable = true;" in block and not roles and "roles = " not in block:
                roles = set(ROLES)  # the module's default: everything on one host
        units = set(GENERIC_UNITS)
        for role in roles:
            units |= by_role[role]
        units |= services_defined(body)
        for oci in blocks_at(body, ["virtualisation", "oci-containers"]):
            backend = re.search(r'backend = "(\w+)"', oci)
            prefix = backend.group(1) if backend else "podman"
            containers = value_block(oci, "containers") or "{ }"
            units |= {f"{prefix}-{c}.service" for c in top_level_keys(containers)}
        result[node] = (roles, units)
    return result


def ruff(path: Path, builtins: list[str]) -> list[dict]:
    proc = subprocess.run(
        [
            "ruff", "check", "--isolated", "--no-cache", "--output-format=json",
            "--select", RUFF_SELECT, "--line-length", "100",
            "--target-version", "py311",
            "--config", f"builtins = {json.dumps(builtins)}",
            str(path),
        ],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode not in (0, 1):
        fail(f"ruff could not run: {proc.stderr.strip()}")
        return []
    return json.loads(proc.stdout or "[]")


def mypy(path: Path) -> str | None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-implicit-optional", "--no-error-summary",
         "--no-color-output", "--hide-error-context", "--cache-dir", "/dev/null", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    return None if proc.returncode == 0 else (proc.stdout + proc.stderr).strip()


def constants(tree: ast.Module) -> dict[str, object]:
    found: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and isinstance(node.value, ast.Constant):
                found[target.id] = node.value.value
    return found


def string_literals(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append(node.value)
    return out


def node_calls(tree: ast.AST, nodes: list[str]):
    """(node, method, string literals in the call) for every `<node>.<method>(...)`."""
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call):
            continue
        func = call.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if func.value.id in nodes:
                yield func.value.id, func.attr, string_literals(call)
        elif isinstance(func, ast.Name) and call.args:
            first = call.args[0]
            if isinstance(first, ast.Name) and first.id in nodes:
                yield first.id, func.id, string_literals(call)


def check_common_constants(tree: ast.Module) -> None:
    consts = constants(tree)
    for name, (file, pattern) in {**PORT_SOURCES, **OTHER_CONSTANTS}.items():
        if name not in consts:
            fail(f"common.py has no {name}")
            continue
        m = re.search(pattern, (ROOT / file).read_text())
        if not m:
            fail(f"{name}: pattern not found in {file} (did the option move?)")
        elif str(consts[name]) != m.group(1):
            fail(f"{name} = {consts[name]!r} but {file} says {m.group(1)}")
        else:
            ok(f"{name} = {consts[name]!r} matches {file}")
    for name, (value, why) in NIXPKGS_PORTS.items():
        if consts.get(name) != value:
            fail(f"{name} should be {value} ({why})")
        else:
            ok(f"{name} = {value} ({why})")
    if name_ports := [n for n in consts if n.endswith("_PORT")]:
        unknown = set(name_ports) - set(PORT_SOURCES) - set(NIXPKGS_PORTS)
        for n in sorted(unknown):
            fail(f"{n}: a port constant without a known source (add it to PORT_SOURCES)")
    ca = consts.get("CA_FILE")
    if not isinstance(ca, str) or not ca.startswith("/etc/"):
        fail("CA_FILE must be a file under /etc provided by nix/tests/nodes.nix")
    elif f'environment.etc."{ca.removeprefix("/etc/")}"' not in (TESTS / "nodes.nix").read_text():
        fail(f"CA_FILE {ca} is not an environment.etc entry of nix/tests/nodes.nix")
    else:
        ok(f"CA_FILE {ca} is provided by nodes.nix")


def crate_binaries() -> set[str]:
    bins = {p.stem for p in (ROOT / "src" / "bin").glob("*.rs")}
    cargo = (ROOT / "Cargo.toml").read_text() if (ROOT / "Cargo.toml").exists() else ""
    bins |= set(re.findall(r'\[\[bin\]\]\s*name\s*=\s*"([^"]+)"', cargo))
    return bins


def check_test(nix_file: Path, by_role: dict[str, set[str]], common_tree: ast.Module) -> None:
    name = nix_file.stem
    print(f"\n== {name}")
    info = evaluate_test(nix_file)
    nodes: list[str] = info["nodes"]  # type: ignore[assignment]
    script: str = info["testScript"]  # type: ignore[assignment]
    ok(f"evaluates: name {info['name']!r}, nodes {nodes}")
    own = (TESTS / f"{name}.py").read_text()
    common = (TESTS / "common.py").read_text()
    if script != common + own:
        fail(f"{name}: testScript is not common.py + {name}.py")

    for node in nodes:
        if not node.isidentifier():
            fail(f"node {node!r} is not a Python identifier")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.py"
        path.write_text(script)
        builtins = DRIVER_SYMBOLS + nodes + VLANS
        offset = common.count("\n")
        problems = ruff(path, builtins)
        ran = not any(f.startswith("ruff could not run") for f in failures)
        for p in problems:
            line = p["location"]["row"]
            where = f"common.py:{line}" if line <= offset else f"{name}.py:{line - offset}"
            fail(f"ruff {p['code']} {where}: {p['message']}")
        if ran and not problems:
            ok(f"ruff ({RUFF_SELECT}) with builtins {', '.join(nodes)} + driver globals")

        typed = Path(tmp) / f"{name}_typed.py"
        stub = (TESTS / "lint" / "driver_stub.py").read_text()
        decls = "".join(f"{n}: Machine\n" for n in nodes)
        typed.write_text(stub + decls + script)
        errors = mypy(typed)
        if errors:
            fail(f"mypy on driver stub + {name} script:\n{errors}")
        else:
            ok("mypy --no-implicit-optional with the driver stub")

    tree = ast.parse(own)
    # every node is driven by the script
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    for node in nodes:
        if node not in used:
            fail(f"node {node} is never used by {name}.py")
    # hosts looked up by name are nodes
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "ipv4":
            host = call.args[1]
            if not (isinstance(host, ast.Constant) and host.value in nodes):
                fail(f"ipv4(..., {ast.unparse(host)}) is not a node of {name}")
    # units each node waits for / restarts / analyses exist on that node
    per_node = node_roles_and_units(nix_file, nodes, by_role)
    all_units = set().union(*(u for _, u in per_node.values()))
    for node, method, literals in node_calls(tree, nodes):
        for lit in literals:
            for unit in UNIT_RE.findall(lit):
                if unit in per_node[node][1]:
                    ok(f"{node}.{method}: {unit} exists on {node} (roles {sorted(per_node[node][0])})")
                else:
                    fail(f"{node}.{method}: {unit} is not defined on node {node}")
    for lit in string_literals(common_tree):
        for unit in UNIT_RE.findall(lit):
            if unit not in all_units:
                fail(f"common.py names {unit}, which no node of {name} has")
    # commands the scripts call that the test's Nix side provides
    literals = string_literals(tree) + string_literals(common_tree)
    commands = set()
    for lit in literals:
        commands.update(re.findall(r"(?:^|\$\(|[;&|]\s*)(pageviews-[a-z-]+)\s", lit))
    nodes_nix = (TESTS / "nodes.nix").read_text()
    for command in sorted(commands):
        if f'writeShellScriptBin "{command}"' in nodes_nix:
            ok(f"{command}: shell helper in nodes.nix")
        elif command in crate_binaries():
            ok(f"{command}: binary of the crate (on the nodes via the package)")
        else:
            msg = f"{command}: not provided by nodes.nix nor a src/bin/*.rs of the crate (yet)"
            warnings.append(msg)
            print(f"WARN {msg}")


def main() -> int:
    os.chdir(ROOT)
    common_src = (TESTS / "common.py").read_text()
    common_tree = ast.parse(common_src)
    print("== common.py constants against the Nix side")
    check_common_constants(common_tree)
    by_role = module_units_by_role()
    for role in ROLES:
        ok(f"role {role}: {', '.join(sorted(by_role[role]))}")
    tests = sorted(TESTS.glob("vm-*.nix"))
    if not tests:
        fail("no nix/tests/vm-*.nix")
    for nix_file in tests:
        if not (TESTS / f"{nix_file.stem}.py").exists():
            fail(f"{nix_file.name} has no {nix_file.stem}.py")
            continue
        check_test(nix_file, by_role, common_tree)
    for py in sorted(TESTS.glob("*.py")):
        if py.name != "common.py" and not (TESTS / f"{py.stem}.nix").exists():
            fail(f"{py.name} belongs to no test")
    print()
    for w in warnings:
        print(f"warning: {w}")
    if failures:
        print(f"check-vm-tests: {len(failures)} problem(s)")
        return 1
    print("check-vm-tests: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
