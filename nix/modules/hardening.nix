# systemd sandboxing shared by pageviews-app, pageviews-worker and pageviews-migrate.
#
# A pure attribute set of `serviceConfig` keys: it needs neither nixpkgs nor lib, so
# `nix-instantiate --eval --strict --json nix/modules/hardening.nix` prints it.
# ./service-config.nix merges it under each unit's own User=/Group=/directories/credentials;
# units.nix deploys that, and scripts/systemd-score renders the same into unit files for
# `systemd-analyze security --offline`.
#
# Not set here, on purpose:
# - IPAddressAllow/IPAddressDeny: the module adds them per role (loopback on one host, the
#   database/broker/proxy peers when split), since they depend on the deployment.
# - PrivateNetwork: the app and worker talk TCP to PostgreSQL/RabbitMQ on other hosts.
{
  # Identity: the module sets User=/Group= to dedicated static system users (nginx must be
  # in the app's group to reach its Unix socket, and PostgreSQL peer auth maps by name).
  NoNewPrivileges = true;
  CapabilityBoundingSet = [""];
  AmbientCapabilities = [""];

  # Filesystem
  ProtectSystem = "strict";
  ProtectHome = true;
  PrivateTmp = true;
  PrivateDevices = true;
  DevicePolicy = "closed";
  PrivateMounts = true;
  UMask = "0077";
  ProtectProc = "invisible";
  ProcSubset = "pid";

  # Kernel, clock, host
  ProtectKernelTunables = true;
  ProtectKernelModules = true;
  ProtectKernelLogs = true;
  ProtectControlGroups = true;
  ProtectClock = true;
  ProtectHostname = true;
  PrivateUsers = true;
  KeyringMode = "private";

  # IPC, namespaces, execution
  RestrictAddressFamilies = ["AF_UNIX" "AF_INET" "AF_INET6"];
  RestrictNamespaces = true;
  RestrictRealtime = true;
  RestrictSUIDSGID = true;
  RemoveIPC = true;
  LockPersonality = true;
  MemoryDenyWriteExecute = true;
  SystemCallArchitectures = "native";
  SystemCallFilter = ["@system-service" "~@privileged" "~@resources"];
  SystemCallErrorNumber = "EPERM";

  # Robustness: both binaries drain on SIGTERM and exit 0.
  KillSignal = "SIGTERM";
  TimeoutStopSec = "30s";
  LimitNOFILE = 65536;
}
