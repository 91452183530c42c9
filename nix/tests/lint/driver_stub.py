# Type information for the NixOS test driver's globals, as the pageviews VM test scripts
# use them, so mypy can check the scripts here the way nixpkgs' build does (it prepends
# nixos/lib/test-script-prepend.py plus one `<node>: QemuMachine` line per node and runs
# `mypy --no-implicit-optional`). Written from the signatures read in nixpkgs
# nixos/lib/test-driver/src/test_driver/machine/__init__.py (NixOS/nixpkgs 019697db) and
# driver.py (NixOS/nixpkgs 003d5816); only the methods the scripts may call are listed.
# scripts/check-vm-tests appends `<node>: Machine` for each node of the test.
from collections.abc import Callable
from contextlib import AbstractContextManager


class Machine:
    name: str
    booted: bool

    def log(self, msg: str) -> None:
        raise NotImplementedError

    def succeed(self, *commands: str, timeout: int | None = None) -> str:
        raise NotImplementedError

    def fail(self, *commands: str, timeout: int | None = None) -> str:
        raise NotImplementedError

    def execute(
        self,
        command: str,
        check_return: bool = True,
        check_output: bool = True,
        timeout: int | None = 900,
    ) -> tuple[int, str]:
        raise NotImplementedError

    def wait_until_succeeds(self, command: str, timeout: int = 900) -> str:
        raise NotImplementedError

    def wait_until_fails(self, command: str, timeout: int = 900) -> str:
        raise NotImplementedError

    def wait_for_unit(self, unit: str, user: str | None = None, timeout: int = 900) -> None:
        raise NotImplementedError

    def wait_for_open_port(self, port: int, addr: str = "localhost", timeout: int = 900) -> None:
        raise NotImplementedError

    def wait_for_file(self, filename: str, timeout: int = 900) -> None:
        raise NotImplementedError

    def systemctl(self, q: str, user: str | None = None) -> tuple[int, str]:
        raise NotImplementedError

    def get_unit_property(self, unit: str, property: str, user: str | None = None) -> str:
        raise NotImplementedError

    def require_unit_state(self, unit: str, require_state: str = "active") -> None:
        raise NotImplementedError

    def sleep(self, secs: int) -> None:
        raise NotImplementedError

    def start(self, allow_reboot: bool = False) -> None:
        raise NotImplementedError

    def crash(self) -> None:
        raise NotImplementedError


start_all: Callable[[], None]
retry: Callable[..., None]
subtest: Callable[[str], AbstractContextManager[None]]
