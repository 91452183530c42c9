#!/usr/bin/env python3
"""Checks the NixOS VM test scripts without nixpkgs (run by scripts/check-vm-tests).

For each nix/tests/vm-*.nix:
  1. evaluates, with nix-instantiate and stub arguments (nothing from nixpkgs is forced),
     the test's `name` and node names, and that its `testScript` is nodes.nix `script`
     (constants generated from the nodes' configuration, then common.py and <test>.py);
  2. lints common.py + <test>.py with ruff, the driver's globals declared as builtins: the
     symbols nixpkgs' driver.py `test_symbols()` exports, one per node, `vlan1`, and the
     names of the generated constants (read from nodes.nix `base` and the test's `constants`);
  3. type-checks it with mypy against the real NixOS test driver (its sources and
     test-script-prepend.py from a cache outside the repository, $NIXOS_TEST_DRIVER; skipped
     without it), one fake machine per node, `--no-implicit-optional`, the constants as `Any`;
  4. checks consistency with the Nix side: every node is used; hosts looked up by name are
     nodes; every unit a node waits for or restarts, in the script or in a common.py function
     the script hands the node to, exists on that node (from its roles in nix/modules, its
     own systemd.services / oci-containers, the nixpkgs services our modules enable, or the
     transient units they start); the files and commands the scripts use are provided by
     the test's Nix files or the module.
Then rules for nix/modules, the example host and the flake that an evaluation against nixpkgs
found broken once, checked without nixpkgs:
  F1 no option nixpkgs itself defines with mkDefault is defined with mkDefault again
     (types.package merges one definition per priority: "defined multiple times");
  1  no module flips the host's firewall backend, and source-address rules exist for both
     backends (nftables extraInputRules, iptables extraCommands);
  2  `nix run .#vm`: a forwarded HTTP port redirects to the forwarded HTTPS port, and the
     README/flake text names exactly the forwarded ports;
  4  services.pageviews.package is a mkPackageOption of pkgs.pageviews, which the flake's
     overlays.default provides;
  5  the units' serviceConfig has one source (nix/modules/service-config.nix): units.nix adds
     nothing to it, scripts/systemd-score types none of it, and its single-host owner is the
     option default.
Exit status 0 only if everything passes.
"""

from __future__ import annotations

import ast
import functools
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

# Units of nixpkgs services that our modules enable: unit -> (roles, file of ours, needle).
PG_ENABLED = "services.postgresql = lib.mkIf common.localData {\n      enable = true;"
RABBITMQ_ENABLED = "services.rabbitmq = lib.mkIf common.localBroker {\n      enable = true;"
NIXPKGS_UNITS = {
    "postgresql.service": (("data",), "data.nix", PG_ENABLED),
    "postgresql.target": (("data",), "data.nix", PG_ENABLED),
    "postgresql-setup.service": (("data",), "data.nix", "systemd.services.postgresql-setup"),
    # the data host's single broker, or a broker host's cluster node
    "rabbitmq.service": (("data", "broker"), "data.nix", RABBITMQ_ENABLED),
    "nginx.service": (("proxy",), "proxy.nix", "services.nginx = {\n      enable = true;"),
    # services.postgresqlBackup's unit for the default database name
    "postgresqlBackup-pageviews.service": (("data",), "backup.nix", "databases = [cfg.database.name];"),
}
# Transient units our modules start with systemd-run: unit -> (roles, file of ours, needle).
TRANSIENT_UNITS = {
    # `pageviews-admin`, the admin tool in a unit of its own (on an app host)
    "pageviews-admin.service": (("app",), "units.nix", 'adminUnit = "pageviews-admin";'),
}
GENERIC_UNITS = {"multi-user.target", "network-online.target", "network.target"}
UNIT_RE = re.compile(r"\b([A-Za-z0-9@_.-]+\.(?:service|target|socket|timer))\b")
ROLES = ("proxy", "app", "data", "broker")

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
          pkgs = stub; module = stub; probe = stub; images = stub; tls = stub; secrets = stub;
        }};
      in {{
        inherit (t) name;
        script = builtins.isFunction t.testScript;
        nodes = builtins.attrNames t.nodes;
      }}
    """
    return nix_eval(expr)  # type: ignore[return-value]


@functools.cache
def parsed(path: Path) -> str:
    """The file as `nix-instantiate --parse` prints it: comments gone, one line."""
    return subprocess.run(
        ["nix-instantiate", "--parse", str(path)], check=True, capture_output=True, text=True
    ).stdout


def _walk(text: str, start: int = 0):
    """(index, char, depth) of every character of `text` from `start` that is outside a "..."
    string (parse output prints every string so); depth counts brackets from `start`, already
    updated for the bracket itself. The one scanner of parse output here."""
    depth, in_str, i = 0, False, start
    while i < len(text):
        c = text[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        else:
            if c in "{([":
                depth += 1
            elif c in "})]":
                depth -= 1
            yield i, c, depth
        i += 1


def attr_block(text: str, start: int) -> str:
    """The `{ ... }` starting at or after index `start`."""
    i = text.index("{", start)
    for j, c, depth in _walk(text, i):
        if c == "}" and depth == 0:
            return text[i : j + 1]
    raise ValueError("unbalanced braces")


def value_end(text: str, start: int) -> int:
    """Index of the `;` that ends the value starting at `start` (the text's end without one)."""
    return next((j for j, c, depth in _walk(text, start) if c == ";" and depth == 0), len(text))


def top_level_keys(block: str) -> list[str]:
    """Attribute names at depth 1 of a `{ a = ...; b.c = ...; }` block."""
    keys, expect_key = [], True
    for i, c, depth in _walk(block):
        if c in "{([})]":
            expect_key = expect_key or (depth == 1 and c == "{")
        elif c == ";" and depth == 1:
            expect_key = True
        elif depth == 1 and expect_key and not c.isspace():
            m = re.match(r'(?:inherit\b[^;]*)|"?([A-Za-z_][\w\'-]*)"?', block[i:])
            if m and m.group(1):
                keys.append(m.group(1))
            expect_key = False
    return keys


def _depth1_key(block: str, key: str, suffix: str) -> int | None:
    """Index of `<key> = <suffix>` at depth 1 of `block` (parse output), if there."""
    for i, _, depth in _walk(block):
        if depth == 1 and block.startswith(f"{key} = {suffix}", i) and block[i - 1] in " {;":
            return i
    return None


def value_block(block: str, key: str) -> str | None:
    """The `{ ... }` value of attribute `key` at depth 1 of `block`, if it is one."""
    i = _depth1_key(block, key, "{")
    return attr_block(block, i) if i is not None else None


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
        if path.name == "data.nix":  # PostgreSQL for "data", RabbitMQ for "broker" (or both)
            roles = ["data", "broker"]
        if path.name == "cluster.nix":  # the broker side of a cluster
            roles = ["broker"]
        for unit in services_defined(parsed(path)):
            for role in roles:
                units[role].add(unit)
    for unit, (roles, file, needle) in NIXPKGS_UNITS.items():
        if needle in (MODULES / file).read_text():
            for role in roles:
                units[role].add(unit)
        else:
            fail(f"{unit}: nix/modules/{file} no longer enables its nixpkgs service")
    for unit, (roles, file, needle) in TRANSIENT_UNITS.items():
        if needle in (MODULES / file).read_text():
            for role in roles:
                units[role].add(unit)
        else:
            fail(f"{unit}: nix/modules/{file} no longer starts this transient unit")
    return units


def node_roles_and_units(nix_file: Path, nodes: list[str], by_role: dict[str, set[str]]):
    """Per node: the pageviews roles it runs and the units it has."""
    text = parsed(nix_file)
    # the test's own `nodes = {`, not an option path ending in `.nodes` (vm-cluster)
    nodes_at = re.search(r"(?<![.\w])nodes = \{", text)
    assert nodes_at, nix_file
    nodes_block = attr_block(text, nodes_at.start())
    result: dict[str, tuple[set[str], set[str]]] = {}
    # roles: `(pageviews [ "x" ])` (a test's `shared.member` helper), `roles = [ ... ]`, or
    # the module with services.pageviews set but no roles (nodes.nix `stack`: all of them)
    for node in nodes:
        m = re.search(rf"\b{re.escape(node)} = ", nodes_block)
        assert m, node
        # the node's own definition runs to the next top-level `;` of the nodes block
        body = nodes_block[m.end() : value_end(nodes_block, m.end())]
        roles: set[str] = set()
        for call in re.findall(r"\(pageviews \[ ([^\]]*)\]\)", body):
            roles.update(re.findall(r'"(\w+)"', call))
        m_roles = re.search(r"roles = \[ ([^\]]*)\]", body)
        if m_roles:
            roles.update(re.findall(r'"(\w+)"', m_roles.group(1)))
        for block in blocks_at(body, ["services", "pageviews"]):
            if "enable = true;" in block and not roles and "roles = " not in block:
                roles = set(ROLES)  # the module's default: everything on one host
        if re.search(r"\(shared\)\.stack\b", body):
            roles = set(ROLES)  # nodes.nix `stack`: the module's default
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


# The NixOS test driver's Python sources (nixos/lib/test-driver/src/test_driver and
# nixos/lib/test-script-prepend.py, at their nixpkgs paths), kept outside the repository like
# the nixos-eval harness's cache; README says how to fill it. Without it the type check is
# skipped, never run against a hand-written model of the driver.
DRIVER_CACHE = Path(
    os.environ.get("NIXOS_TEST_DRIVER", Path.home() / ".cache" / "nixos-test-driver")
)


def load_driver() -> dict[str, str] | None:
    src = DRIVER_CACHE / "nixos" / "lib" / "test-driver" / "src"
    prepend = DRIVER_CACHE / "nixos" / "lib" / "test-script-prepend.py"
    if not (src / "test_driver" / "machine" / "__init__.py").is_file() or not prepend.is_file():
        return None
    return {"src": str(src), "prepend": prepend.read_text()}


DRIVER = load_driver()


def mypy(path: Path) -> str | None:
    assert DRIVER is not None
    # The driver's own modules are read for their types, not checked (follow-imports=silent);
    # its third-party imports (colorama, junit_xml, ptpython, remote_pdb) need not be here.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--python-version", "3.13", "--no-implicit-optional",
         "--follow-imports=silent", "--ignore-missing-imports", "--no-error-summary",
         "--no-color-output", "--hide-error-context", "--cache-dir", "/dev/null", str(path)],
        capture_output=True, text=True, env={**os.environ, "MYPYPATH": DRIVER["src"]},
    )  # fmt: skip
    return None if proc.returncode == 0 else (proc.stdout + proc.stderr).strip()


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


def common_node_calls(tree: ast.AST, common_tree: ast.Module, nodes: list[str]):
    """(node, method, string literals in the call) for the calls on a node inside the common.py
    functions the script calls with nodes as arguments (check_operations(client, app, ...)):
    their parameters bound to those nodes, through the functions those call in turn."""
    defs = {d.name: d for d in common_tree.body if isinstance(d, ast.FunctionDef)}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()

    def machine(expr: ast.expr, env: dict[str, str]) -> str | None:
        return env.get(expr.id) if isinstance(expr, ast.Name) else None

    def walk(body: ast.AST, env: dict[str, str]):
        for call in ast.walk(body):
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
                continue
            fn = defs.get(call.func.id)
            if fn is None:
                continue
            params = [a.arg for a in fn.args.args]
            pairs = zip(params, call.args, strict=False)  # defaults stay unbound
            bound = {p: n for p, a in pairs if (n := machine(a, env))}
            bound |= {k.arg: n for k in call.keywords if k.arg and (n := machine(k.value, env))}
            key = (fn.name, tuple(sorted(bound.items())))
            if not bound or key in seen:
                continue
            seen.add(key)
            for inner in ast.walk(fn):
                if not isinstance(inner, ast.Call):
                    continue
                f = inner.func
                if isinstance(f, ast.Attribute) and (n := machine(f.value, bound)):
                    yield n, f"{f.attr} (in {fn.name})", string_literals(inner)
                elif isinstance(f, ast.Name) and inner.args and (n := machine(inner.args[0], bound)):
                    yield n, f"{f.id} (in {fn.name})", string_literals(inner)
            yield from walk(fn, bound)

    yield from walk(tree, {n: n for n in nodes})


def script_constants(nix_file: Path) -> list[str]:
    """Names of the constants a test's script gets from nodes.nix `script` (their values come
    from the nodes when the driver is built; only the names are needed to lint here): `base`
    there, and the test's `constants = nodes: shared.constantsOf { <part> = ...; } // { ... }`,
    whose parts' names nodes.nix gives for a stub node."""
    names = []
    text = parsed(TESTS / "nodes.nix")
    at = text.find("base = ")
    names += top_level_keys(attr_block(text, at)) if at >= 0 else []
    if not names:
        fail("nodes.nix: no `base` attribute set of constants")
    text = parsed(nix_file)
    at = text.find("constants = (nodes: ")
    if at < 0:
        fail(f"{nix_file.name}: no `constants = nodes: ...`")
        return names
    expr = text[at : value_end(text, at + len("constants = "))]
    parts_at = expr.find("(shared).constantsOf {")
    if parts_at < 0:
        # a test's own attribute set only: `nodes: { ... }` or `nodes: let ... in { ... }`
        keys = top_level_keys(attr_block(expr, expr.find(" in {") if " in {" in expr else 0))
        if not keys:
            fail(f"{nix_file.name}: no attribute set of constants in `constants`")
        return names + keys
    parts_block = attr_block(expr, parts_at)
    parts = top_level_keys(parts_block)
    if not parts:
        fail(f"{nix_file.name}: `shared.constantsOf` without parts")
    else:
        stub_parts = " ".join(f"{p} = stub;" for p in parts)
        names += nix_eval(
            f"""let
                  stub = throw "a stub node";
                  shared = import {TESTS}/nodes.nix {{
                    pkgs = stub; module = stub; tls = stub; secrets = stub;
                  }};
                in builtins.attrNames (shared.constantsOf {{ {stub_parts} }})"""
        )  # type: ignore[operator]
    # the test's own, `// { ... }` right after the parts
    parts_end = expr.index(parts_block, parts_at) + len(parts_block)
    own = re.match(r"\)* // \{", expr[parts_end:])
    if own:
        names += top_level_keys(attr_block(expr, parts_end + own.start()))
    return names


def crate_binaries() -> set[str]:
    """The service's binaries (src/bin, on the nodes through the module) and the probe's
    (tools/probe/, the `probe` package nodes.nix gives the client)."""
    bins = {p.stem for p in (ROOT / "src" / "bin").glob("*.rs")}
    probe = ROOT / "tools" / "probe"
    if (probe / "src" / "main.rs").exists():
        bins |= set(re.findall(r'^name\s*=\s*"([^"]+)"', (probe / "Cargo.toml").read_text(), re.M))
    return bins


def common_used_by(tree: ast.AST, common_tree: ast.Module) -> list[ast.stmt]:
    """The parts of common.py a test's script runs: its top-level statements but function
    definitions, and the functions the script calls, directly or through other functions."""
    defs = {d.name: d for d in common_tree.body if isinstance(d, ast.FunctionDef)}
    used: set[str] = set()
    todo = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in defs]
    while todo:
        name = todo.pop()
        if name not in used:
            used.add(name)
            todo += [n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name) and n.id in defs]
    return [d for d in common_tree.body if not isinstance(d, ast.FunctionDef) or d.name in used]


def check_test(nix_file: Path, by_role: dict[str, set[str]], common_tree: ast.Module) -> None:
    name = nix_file.stem
    print(f"\n== {name}")
    info = evaluate_test(nix_file)
    nodes: list[str] = info["nodes"]  # type: ignore[assignment]
    ok(f"evaluates: name {info['name']!r}, nodes {nodes}")
    own = (TESTS / f"{name}.py").read_text()
    common = (TESTS / "common.py").read_text()
    wiring = f"testScript = ((shared).script {TESTS}/{name}.py constants);"
    if not info["script"] or wiring not in parsed(nix_file):
        fail(f"{name}: testScript is not `shared.script ./{name}.py constants` (nodes.nix)")
    consts = script_constants(nix_file)
    ok(f"constants from the Nix side: {', '.join(consts)}")
    # What nodes.nix `script` writes, with the constants' values left to the driver build.
    script = common + own

    for node in nodes:
        if not node.isidentifier():
            fail(f"node {node!r} is not a Python identifier")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.py"
        path.write_text(script)
        builtins = DRIVER_SYMBOLS + nodes + VLANS + consts
        offset = common.count("\n")
        problems = ruff(path, builtins)
        ran = not any(f.startswith("ruff could not run") for f in failures)
        for p in problems:
            line = p["location"]["row"]
            where = f"common.py:{line}" if line <= offset else f"{name}.py:{line - offset}"
            fail(f"ruff {p['code']} {where}: {p['message']}")
        if ran and not problems:
            ok(f"ruff ({RUFF_SELECT}) with builtins {', '.join(nodes)} + driver globals")

        if DRIVER is None:
            print(f"SKIP mypy: no NixOS test-driver sources at {DRIVER_CACHE} (README: VM tests)")
        else:
            # What nixpkgs' driver.nix puts before a script: test-script-prepend.py, then one
            # fake machine per node; the constants are Any.
            typed = Path(tmp) / f"{name}_typed.py"
            decls = "".join(f"{n} = create_fake_qemu_machine()\n" for n in nodes)
            decls += "from typing import Any\n" + "".join(f"{c}: Any\n" for c in consts)
            typed.write_text(DRIVER["prepend"] + decls + script)
            errors = mypy(typed)
            if errors:
                fail(f"mypy on the NixOS test driver + {name} script:\n{errors}")
            else:
                ok("mypy --no-implicit-optional against the NixOS test driver's sources")

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
    calls = list(node_calls(tree, nodes)) + list(common_node_calls(tree, common_tree, nodes))
    for node, method, literals in calls:
        for lit in literals:
            for unit in UNIT_RE.findall(lit):
                if unit in per_node[node][1]:
                    ok(f"{node}.{method}: {unit} exists on {node} (roles {sorted(per_node[node][0])})")
                else:
                    fail(f"{node}.{method}: {unit} is not defined on node {node}")
    common_used = ast.Module(body=common_used_by(tree, common_tree), type_ignores=[])
    for lit in string_literals(common_used):
        for unit in UNIT_RE.findall(lit):
            if unit not in all_units:
                fail(f"common.py names {unit}, which no node of {name} has (code {name}.py runs)")
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
        elif any(f'writeShellScriptBin "{command}"' in m.read_text() for m in MODULES.glob("*.nix")):
            ok(f"{command}: shell helper of nix/modules (on the nodes via the module)")
        else:
            msg = f"{command}: not provided by nodes.nix, nix/modules, src/bin/*.rs nor tools/probe/ (yet)"
            warnings.append(msg)
            print(f"WARN {msg}")


# Options nixpkgs modules define themselves with mkDefault: a second mkDefault definition of
# a single-valued option is "defined multiple times".
NIXPKGS_MKDEFAULT = {
    "services.postgresql.package": "postgresql.nix: mkDefault by system.stateVersion",
    "services.postgresql.dataDir": "postgresql.nix: mkDefault /var/lib/postgresql/<psqlSchema>",
}
# Options that choose the host's firewall backend: the host's decision, never a module's.
HOST_FIREWALL_CHOICE = ["networking.nftables.enable", "networking.firewall.backend"]


def attr_value(block: str, key: str) -> str | None:
    """The text of `key = <value>;` at depth 1 of `block` (parse output), if defined there."""
    i = _depth1_key(block, key, "")
    if i is None:
        return None
    start = i + len(key) + 3
    end = value_end(block, start)
    return block[start:end].strip() if end < len(block) else None


def definitions(text: str, option: str) -> list[str]:
    """Every value parse output `text` gives the option path `option` (a.b.c)."""
    path = option.split(".")
    return [v for b in blocks_at(text, path[:-1]) if (v := attr_value(b, path[-1])) is not None]


def module_files() -> list[Path]:
    return sorted(MODULES.glob("*.nix"))


def module_definitions(option: str) -> list[tuple[str, str]]:
    """(file name, value text) of every definition of `option` in nix/modules/*.nix."""
    return [(p.name, v) for p in module_files() for v in definitions(parsed(p), option)]


def check_nixpkgs_defaults() -> None:
    bad = [(f, o) for o in NIXPKGS_MKDEFAULT for f, v in module_definitions(o) if "mkDefault" in v]
    for file, option in bad:
        fail(f"F1 nix/modules/{file} defines {option} with mkDefault, as nixpkgs does "
             f"({NIXPKGS_MKDEFAULT[option]}): two definitions at one priority")
    if not bad:
        ok(f"F1 no module repeats nixpkgs' mkDefault of {', '.join(NIXPKGS_MKDEFAULT)}")


def check_firewall_backend() -> None:
    bad = [(f, o) for o in HOST_FIREWALL_CHOICE for f, _ in module_definitions(o)]
    for file, option in bad:
        fail(f"1 nix/modules/{file} sets {option}: the firewall backend is the host's choice")
    nft = sorted({f for f, _ in module_definitions("networking.firewall.extraInputRules")})
    ipt = sorted({f for f, _ in module_definitions("networking.firewall.extraCommands")})
    if nft != ipt:
        fail(f"1 source-address rules for one backend only: extraInputRules (nftables) in {nft}, "
             f"extraCommands (iptables) in {ipt}")
    elif not bad:
        ok(f"1 no module sets {' / '.join(HOST_FIREWALL_CHOICE)}; rules for both backends in {nft}")


def vm_variant() -> dict:
    # example.nix only calls lib.mkDefault / lib.mkForce: identity is enough to read the VM
    # variant's data (priorities do not matter here, the harness evaluates them for real).
    return nix_eval(
        f"""(import {ROOT}/nix/hosts/example.nix {{
              lib = {{ mkDefault = x: x; mkForce = x: x; }};
            }}).virtualisation.vmVariant"""
    )  # type: ignore[return-value]


def check_vm_redirect() -> None:
    vm = vm_variant()
    forwards = vm.get("virtualisation", {}).get("forwardPorts", [])
    host_port = {f["guest"]["port"]: f["host"]["port"] for f in forwards if f.get("from") == "host"}
    https = host_port.get(443)
    if https is None:
        fail("2 the example VM forwards no host port to the guest's 443")
        return
    expected = {https} | ({host_port[80]} if 80 in host_port else set())
    if 80 in host_port:
        vhosts = vm.get("services", {}).get("nginx", {}).get("virtualHosts", {})
        # forceSSL's own form (location / { return ... }) or a server-level return
        redirect = re.compile(rf"(?:^|\breturn )30[178] https://\$host:{https}\$request_uri\b")
        targets = [v.get("locations", {}).get("/", {}).get("return") or "" for v in vhosts.values()]
        targets += [v.get("extraConfig", "") for v in vhosts.values()]
        if not any(redirect.search(t) for t in targets):
            fail(f"2 the example VM forwards host {host_port[80]} to the guest's 80, but no vhost of "
                 f"its vmVariant redirects to https://$host:{https}$request_uri (forceSSL's "
                 "redirect goes to port 443, which is not forwarded)")
        elif not any(v.get("forceSSL") is False for v in vhosts.values()):
            fail("2 the example VM adds a port-80 redirect but keeps forceSSL's own port-80 server")
        else:
            ok(f"2 VM: host {host_port[80]} -> guest 80 redirects to https://$host:{https}")
    # every text about `nix run .#vm` names exactly the forwarded ports
    readme = (ROOT / "README.md").read_text()
    blocks = re.split(r"\n(?=\s*(?:[-|]|\n))", readme)
    texts = [("README.md", b) for b in blocks if "nix run .#vm" in b]
    flake = (ROOT / "flake.nix").read_text()
    m = re.search(r'vm = \{[^}]*meta\.description = "([^"]*)"', flake)
    texts.append(("flake.nix apps.vm", m.group(1) if m else ""))
    header = (ROOT / "nix" / "hosts" / "example.nix").read_text().split("\n{", 1)[0]
    texts.append(("nix/hosts/example.nix header", header))
    if not any(re.search(r"localhost:\d+", b) for w, b in texts if w == "README.md"):
        fail("2 README.md says nowhere at which localhost ports `nix run .#vm` answers")
    for where, text in texts:
        ports = {int(p) for p in re.findall(r"localhost:(\d+)", text)}
        if not ports and where == "README.md":
            continue  # mentions the VM without naming a port: no claim to check
        if ports != expected:
            fail(f"2 {where}: names localhost ports {sorted(ports)} for `nix run .#vm`, "
                 f"but the VM forwards {sorted(expected)}: {' '.join(text.split())[:160]!r}")
        else:
            ok(f"2 {where}: localhost ports {sorted(ports)} as forwarded")


def check_package_option() -> None:
    default = parsed(MODULES / "default.nix")
    values = definitions(default, "options.services.pageviews.package") or [
        v for b in blocks_at(default, ["options"]) for pv in [value_block(b, "services")] if pv
        for pb in [value_block(pv, "pageviews")] if pb for v in [attr_value(pb, "package")] if v
    ]
    if not any(v.startswith('((lib).mkPackageOption pkgs "pageviews"') for v in values):
        fail("4 services.pageviews.package is not `lib.mkPackageOption pkgs \"pageviews\" ...` "
             f"in nix/modules/default.nix (found {values[:1]})")
    else:
        ok("4 services.pageviews.package = mkPackageOption pkgs \"pageviews\"")
    try:
        names = nix_eval(
            f"""let
                  stub = throw "not available without nixpkgs";
                  f = import {ROOT}/flake.nix;
                  out = f.outputs {{ self = stub; nixpkgs = {{ lib = stub; }}; crane = stub; }};
                in builtins.attrNames (out.overlays.default {{ }} {{ }})"""
        )
    except subprocess.CalledProcessError as e:
        error = [line.strip() for line in e.stderr.splitlines() if "error:" in line]
        fail(f"4 flake.nix has no usable overlays.default: {' '.join(error[:1])}")
        return
    if names != ["pageviews"]:
        fail(f"4 flake.nix overlays.default defines {names}, not exactly pkgs.pageviews")
    else:
        ok("4 flake.nix overlays.default provides pkgs.pageviews")


def check_single_source_units() -> None:
    units_nix = parsed(MODULES / "units.nix")
    extra = blocks_at(units_nix, ["serviceConfig"])
    if extra:
        fail(f"5 nix/modules/units.nix adds serviceConfig of its own ({extra[0][:80]}...): "
             "put it in nix/modules/service-config.nix, which scripts/systemd-score scores")
    if not (MODULES / "service-config.nix").exists():
        fail("5 no nix/modules/service-config.nix: the units' serviceConfig has no single source")
        return
    pure = nix_eval(f"(import {MODULES}/service-config.nix).singleHost")
    assert isinstance(pure, dict)
    defined = {u.removesuffix(".service") for u in services_defined(units_nix) if u.endswith(".service")}
    if defined != set(pure):
        fail(f"5 units.nix defines {sorted(defined)}, service-config.nix {sorted(pure)}")
    for path in module_files():
        if path.name == "units.nix":
            continue
        for block in blocks_at(parsed(path), ["systemd", "services"]):
            for unit in set(top_level_keys(block)) & set(pure):
                fail(f"5 nix/modules/{path.name} also defines systemd.services.{unit}")
    score = (ROOT / "scripts" / "systemd-score").read_text()
    if "service-config.nix" not in score or "singleHost" not in score:
        fail("5 scripts/systemd-score does not score singleHost of nix/modules/service-config.nix")
    keys = sorted({k for cfg in pure.values() for k in cfg})
    typed = [k for k in keys if re.search(rf"\b{k}\b\s*[:=]", score)]
    if typed:
        fail(f"5 scripts/systemd-score types unit settings itself ({', '.join(typed)}): "
             "a second copy of the units")
    default = (MODULES / "default.nix").read_text()
    m = re.search(r'owner = mkOption \{\s*type = types\.str;\s*default = "([^"]+)";', default)
    owner = pure.get("pageviews-migrate", {}).get("User")
    if not m or m.group(1) != owner:
        fail(f"5 singleHost runs pageviews-migrate as {owner!r}, database.owner defaults to "
             f"{m.group(1) if m else '?'!r}")
    if not any(f.startswith("5 ") for f in failures):
        ok(f"5 {', '.join(sorted(pure))}: serviceConfig only from service-config.nix, scored as is")


def check_issue9_rules() -> None:
    print("\n== nix/modules, example host and flake rules")
    check_nixpkgs_defaults()
    check_firewall_backend()
    check_vm_redirect()
    check_package_option()
    check_single_source_units()


def main() -> int:
    os.chdir(ROOT)
    common_src = (TESTS / "common.py").read_text()
    common_tree = ast.parse(common_src)
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
    check_issue9_rules()
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
