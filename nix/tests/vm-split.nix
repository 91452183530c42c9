# The split deployment: `client` (the internet), `proxy` (nginx, TLS), `app` (app, worker,
# migrations) and `data` (PostgreSQL, RabbitMQ), all on one VLAN so that only the
# firewall and the listen addresses keep client and proxy away from the data ports (nftables
# on data, iptables on app).
args: let
  shared = import ./nodes.nix args;

  # A pageviews host of this deployment with `roles`; they all agree on where the others are.
  pageviews = shared.split;

  # What the script needs to know of the Nix side, from the nodes themselves.
  constants = nodes:
    shared.constantsOf {
      app = nodes.app;
      data = nodes.data;
      broker = nodes.data;
    }
    // {
      PUBLIC_PORTS = nodes.proxy.networking.firewall.allowedTCPPorts;
    };
in {
  name = "pageviews-vm-split";

  nodes = {
    client = shared.client "proxy";
    proxy.imports = [(pageviews ["proxy"]) shared.certificate];
    app.imports = [(pageviews ["app"]) (shared.sized 1536)];

    # The two firewall backends the module writes source-address rules for: the data host
    # chooses nftables, the app host keeps the NixOS default (iptables). The firewall
    # subtest checks both.
    data = {
      imports = [(pageviews ["data"]) shared.sql (shared.sized 2048)];
      networking.nftables.enable = true;
    };
  };

  testScript = shared.script ./vm-split.py constants;
}
