# Firewall: only 80 and 443 open to the world (proxy role). When the stack is split, the
# app port and PostgreSQL/RabbitMQ are open only to the listed peer addresses. The host
# chooses the firewall backend; this module never changes it and writes its source-address
# rules for the one in use: nftables (networking.nftables.enable) gets
# networking.firewall.extraInputRules, the iptables firewall (the NixOS default) gets
# networking.firewall.extraCommands. Any other backend (firewalld) fails an assertion.
# On one host nothing else opens: the app is on a Unix socket and the data services
# listen on loopback.
{
  config,
  lib,
  ...
}: let
  cfg = config.services.pageviews;
  fw = config.networking.firewall;
  common = import ./common.nix {inherit lib cfg;};
  inherit (common) localApp localData localProxy splitApp splitData;

  # Newer nixpkgs declare networking.firewall.backend (default: "nftables" when
  # networking.nftables.enable, else "iptables"); older ones decide by nftables.enable alone.
  backend =
    fw.backend
    or (
      if config.networking.nftables.enable
      then "nftables"
      else "iptables"
    );

  # (addresses, ports) this host accepts from specific peers only.
  peerRules =
    lib.optional (localApp && splitApp) {
      addrs = cfg.network.proxyAddresses;
      ports = [cfg.network.appPort];
    }
    ++ lib.optional (localData && splitData) {
      addrs = cfg.network.dataClients;
      ports = [cfg.database.port] ++ lib.optional common.localBroker cfg.rabbitmq.port;
    }
    # A RabbitMQ cluster node: AMQP from the app hosts, epmd and the inter-node port
    # (AMQP + 20000) from the other nodes only.
    ++ lib.optionals (common.localBroker && common.clustered) [
      {
        addrs = cfg.network.dataClients;
        ports = [cfg.rabbitmq.port];
      }
      {
        addrs = map (n: n.address) (lib.filter (n: n.hostName != config.networking.hostName) cfg.rabbitmq.cluster.nodes);
        ports = [4369 (cfg.rabbitmq.port + 20000)];
      }
    ]
    # A node of the Patroni cluster: PostgreSQL from the app hosts and the other nodes (streaming
    # replication, pg_rewind); Patroni's REST API and etcd (client and peer) from the other nodes only.
    ++ lib.optionals common.localDatabase (let
      ha = cfg.database.ha;
      peers = map (n: n.address) (lib.filter (n: n.hostName != config.networking.hostName) ha.nodes);
    in [
      {
        addrs = lib.unique (cfg.network.dataClients ++ peers);
        ports = [cfg.database.port];
      }
      {
        addrs = peers;
        ports = [ha.restApiPort ha.etcd.clientPort ha.etcd.peerPort];
      }
    ]);
  rules = accept: lib.concatMapStrings (r: accept r.addrs r.ports) peerRules;
  restrict = fw.enable && peerRules != [];
in {
  config = lib.mkIf cfg.enable {
    networking.firewall.enable = lib.mkDefault true;
    networking.firewall.allowedTCPPorts = lib.mkIf localProxy [80 443];

    assertions = [
      {
        assertion = restrict -> lib.elem backend ["nftables" "iptables"];
        message = ''
          services.pageviews: a split role (${lib.concatStringsSep ", " cfg.roles}) opens its ports to
          the peer addresses only, through the NixOS firewall's nftables or iptables backend,
          but this host's networking.firewall.backend is "${backend}". Use one of those two
          (networking.nftables.enable chooses nftables), or set networking.firewall.enable = false
          and filter the app port / 5432 / 5672 yourself.
        '';
      }
    ];

    networking.firewall.extraInputRules = lib.mkIf (restrict && backend == "nftables") (rules common.nftAccept);
    networking.firewall.extraCommands = lib.mkIf (restrict && backend == "iptables") (rules common.iptablesAccept);
  };
}
