# Scaling out: several app hosts behind the proxy (nginx upstream over network.appAddresses,
# see proxy.nix) and a RabbitMQ cluster on "broker" hosts (rabbitmq.cluster): quorum queues
# replicated over its nodes, which find each other from the configured node list (classic
# config peer discovery). The Erlang cookie comes from a file on each broker host, handed to
# RabbitMQ as a systemd credential: nixpkgs' `unsafeCookie` would put it in the store.
# The firewall rules between the nodes are in firewall.nix.
# PostgreSQL is one primary on the data host, or the Patroni cluster of ./database-ha.nix.
{
  config,
  lib,
  ...
}: let
  cfg = config.services.pageviews;
  inherit (lib) mkOption types;
  common = import ./common.nix {inherit lib cfg;};
  inherit (common) clustered localBroker;
  nodes = cfg.rabbitmq.cluster.nodes;
  others = lib.filter (n: n.hostName != config.networking.hostName) nodes;
in {
  options.services.pageviews = {
    network.appAddresses = mkOption {
      type = types.listOf types.str;
      default = lib.optional (cfg.network.appAddress != null) cfg.network.appAddress;
      defaultText = lib.literalExpression "lib.optional (appAddress != null) appAddress";
      example = ["10.0.0.2" "10.0.0.4"];
      description = ''
        Private addresses of every app host (split deployments). The proxy balances over
        them (round robin; a host that fails a request is left out for 10 s, and a request
        is never retried on another host, since it may have been stored); the data and
        broker hosts accept connections from them (`dataClients`).
      '';
    };

    rabbitmq.cluster = {
      nodes = mkOption {
        type = types.listOf (types.submodule {
          options = {
            hostName = mkOption {
              type = types.str;
              example = "broker1";
              description = "The broker host's `networking.hostName` (its Erlang node is `rabbit@<hostName>`).";
            };
            address = mkOption {
              type = types.str;
              example = "10.0.0.11";
              description = "The broker host's private address (AMQP and inter-node traffic).";
            };
          };
        });
        default = [];
        description = ''
          The nodes of a RabbitMQ cluster, the same list on every host. Empty: one broker on
          the data host. Otherwise hosts with the `broker` role run RabbitMQ and form the
          cluster from this list at first boot (boot the first node first), the app and the
          worker get every node in `AMQP_URL`, and the data host runs only PostgreSQL.
          Three nodes tolerate the loss of one.
        '';
      };
      cookieFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/rabbitmq-cookie";
        description = ''
          File on each broker host with the cluster's Erlang cookie (the same secret on
          every node, e.g. `openssl rand -hex 32`). Required for a cluster; a path as a
          string, never a Nix path literal (that would copy it into the store).
        '';
      };
    };
  };

  config = lib.mkIf (cfg.enable && clustered) (lib.mkMerge [
    {
      assertions = [
        {
          assertion = cfg.rabbitmq.cluster.cookieFile != null;
          message = "services.pageviews.rabbitmq.cluster: set cookieFile (the Erlang cookie, same on every broker).";
        }
        {
          assertion = lib.all (f: f != null) (lib.attrValues cfg.rabbitmq.passwordFiles);
          message = "services.pageviews.rabbitmq.cluster: set rabbitmq.passwordFiles.{app,worker} (same files on the app and broker hosts).";
        }
        {
          assertion = localBroker -> lib.any (n: n.hostName == config.networking.hostName) nodes;
          message = "services.pageviews: a broker host must be in rabbitmq.cluster.nodes (by networking.hostName).";
        }
      ];
    }
    (lib.mkIf localBroker {
      services.rabbitmq.configItems =
        {
          "cluster_formation.peer_discovery_backend" = "classic_config";
          # A quorum queue declared before every node joined grows to all of them (RabbitMQ
          # >= 3.13: continuous membership reconciliation, checked when a node joins).
          "quorum_queue.continuous_membership_reconciliation.enabled" = "true";
          "quorum_queue.continuous_membership_reconciliation.target_group_size" = toString (lib.length nodes);
          # A node that stops answering (frozen, not dead) is given up after 7.5-12.5 s
          # instead of 45-75 s (Erlang's default tick time, 60 s), so its queues get a new
          # leader and the clients' new connections work (README, "Scaling out").
          "net_ticktime" = "10";
          # When such a node answers again, the others see a partition: restart it.
          "cluster_partition_handling" = "autoheal";
        }
        // lib.listToAttrs (lib.imap1 (i: n: lib.nameValuePair "cluster_formation.classic_config.nodes.${toString i}" "rabbit@${n.hostName}") nodes);

      # The node names are host names: every broker resolves the others.
      networking.hosts = lib.listToAttrs (map (n: lib.nameValuePair n.address [n.hostName]) others);

      # The cookie, installed from the credential before RabbitMQ starts (preStart runs as
      # the rabbitmq user; Erlang wants it readable by that user only).
      systemd.services.rabbitmq = {
        serviceConfig.LoadCredential = ["erlang-cookie:${cfg.rabbitmq.cluster.cookieFile}"];
        preStart = lib.mkAfter ''
          install -m 0400 "$CREDENTIALS_DIRECTORY/erlang-cookie" ${config.services.rabbitmq.dataDir}/.erlang.cookie
        '';
      };
    })
  ]);
}
