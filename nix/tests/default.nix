# NixOS VM tests, wired into the flake's `checks` (they need a builder with KVM):
#   vm-split   client, proxy, app, data: the split deployment and its firewall isolation
#   vm-single  client + one server running the whole stack (plain `services.pageviews.enable`)
#   vm-images  the app and worker OCI images under podman against a data node
#   vm-cluster proxy, two app hosts, a 3-node RabbitMQ cluster, a database host: failover
#   vm-switch  client + one server: `nixos-rebuild switch` (specialisations) under load
#   vm-monitoring  one server with services.pageviews.monitoring: targets, rules, Grafana
#   vm-deploy  vm-split + a deployer: deploy-rs rolls a new generation to the app host under load
#   vm-ha      proxy, app, 3 Patroni/etcd database hosts, a broker, a pgBackRest repository: failover, restore
#
# Each vm-*.nix is a function returning a `runNixOSTest` module; its Python script lives
# next to it, and its testScript (nodes.nix `script`) puts constants taken from the nodes'
# configuration, then common.py, before it. scripts/check-vm-tests lints the Python here.
{
  pkgs,
  module,
  probe,
  images,
  # The flake's inputs (vm-deploy's deployer evaluates the app host's system from them).
  inputs,
}: let
  tls = import ./tls.nix {inherit pkgs;};
  secrets = import ./secrets.nix {inherit pkgs;};
  args = {inherit pkgs module probe images tls secrets inputs;};
  run = file: pkgs.testers.runNixOSTest (import file args);
in {
  vm-split = run ./vm-split.nix;
  vm-single = run ./vm-single.nix;
  vm-images = run ./vm-images.nix;
  vm-cluster = run ./vm-cluster.nix;
  vm-switch = run ./vm-switch.nix;
  vm-monitoring = run ./vm-monitoring.nix;
  vm-deploy = run ./vm-deploy.nix;
  vm-ha = run ./vm-ha.nix;
}
