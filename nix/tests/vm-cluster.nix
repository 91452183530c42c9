# The scaled-out deployment: `client` (the internet), `proxy` (nginx over both app hosts),
# `app1`/`app2` (app, worker), `broker1..3` (a RabbitMQ cluster with quorum queues) and
# `db` (PostgreSQL, one primary), all on one VLAN: only the firewall and the listen
# addresses keep the others away from the broker and database ports.
args: let
  shared = import ./nodes.nix args;
  inherit (shared) ip;

  # A pageviews host of this deployment with `roles`; they all agree on where the others are.
  pageviews = shared.member ({nodes, ...}: {
    imports = [
      (shared.behindProxy ["app1" "app2"])
      (shared.brokerCluster ["broker1" "broker2" "broker3"])
    ];
    services.pageviews.network.dataAddress = ip nodes "db";
  });

  # What the script needs to know of the Nix side, from the nodes themselves.
  constants = nodes:
    shared.constantsOf {
      app = nodes.app1;
      data = nodes.db;
      broker = nodes.broker1;
    };
in {
  name = "pageviews-vm-cluster";

  nodes = {
    client = shared.client "proxy";
    proxy.imports = [(pageviews ["proxy"]) shared.certificate];

    app1.imports = [(pageviews ["app"]) (shared.sized 1024)];
    app2.imports = [(pageviews ["app"]) (shared.sized 1024)];

    broker1.imports = [(pageviews ["broker"]) (shared.sized 1024)];
    broker2.imports = [(pageviews ["broker"]) (shared.sized 1024)];
    broker3.imports = [(pageviews ["broker"]) (shared.sized 1024)];

    db.imports = [(pageviews ["data"]) shared.sql (shared.sized 1536)];
  };

  testScript = shared.script ./vm-cluster.py constants;
}
