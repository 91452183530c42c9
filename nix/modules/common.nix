# Values derived from services.pageviews, shared by the module's files (not a module).
{
  lib,
  cfg,
}: rec {
  # The units' serviceConfig, users and secret paths (pure: scripts/systemd-score reads it too).
  serviceConfig = import ./service-config.nix;

  hasRole = role: builtins.elem role cfg.roles;
  localApp = hasRole "app";
  localData = hasRole "data";
  localProxy = hasRole "proxy";
  # A RabbitMQ cluster (rabbitmq.cluster.nodes) runs on "broker" hosts; without one the
  # data host runs the single broker.
  clustered = cfg.rabbitmq.cluster.nodes != [];
  localBroker = hasRole "broker" || (localData && !clustered);
  # A member of the Patroni cluster of database.ha (database-ha.nix).
  localDatabase = hasRole "database";
  ha = cfg.database.ha.enable;
  brokerAddresses = map (n: n.address) cfg.rabbitmq.cluster.nodes;
  # Every app host, for the nginx upstream (passive failover over all of them).
  inherit (cfg.network) appAddresses;
  # The app and the database/broker live on different hosts: TCP with passwords.
  splitData = localApp != localData;
  # The proxy and the app live on different hosts: the app listens on TCP.
  splitApp = localApp != localProxy;

  inherit (serviceConfig) secretsDir;
  appSocket = "/run/pageviews-app/app.sock";

  # System users, which are also the PostgreSQL roles and the RabbitMQ users.
  users = serviceConfig.users cfg.database.owner;

  # Broker password files, the generated default filled in where the option is null.
  amqpPasswordFile = serviceConfig.amqpPasswordFile cfg.rabbitmq.passwordFiles;
  generatedSecrets = lib.filter (who: cfg.rabbitmq.passwordFiles.${who} == null) ["app" "worker"];

  isIPv6 = addr: lib.hasInfix ":" addr;
  # An address as the host part of a URL.
  urlHost = addr:
    if isIPv6 addr
    then "[${addr}]"
    else addr;
  # Where the app and the worker find PostgreSQL over TCP: every node of database.ha (the
  # client tries them in turn and keeps the one that accepts writes), else database.host.
  databaseAddresses =
    if ha
    then map (n: n.address) cfg.database.ha.nodes
    else lib.optional (cfg.database.host != null) cfg.database.host;
  databaseUrlHosts = lib.concatMapStringsSep "," (a: "${urlHost a}:${toString cfg.database.port}") databaseAddresses;
  databaseUrlQuery = lib.optionalString ha "?target_session_attrs=read-write&connect_timeout=${toString cfg.database.ha.connectTimeout}";
  # An address as a one-host CIDR (for pg_hba).
  hostCidr = addr:
    if isIPv6 addr
    then "${addr}/128"
    else "${addr}/32";
  # Rules accepting TCP ports from a list of addresses only, for the firewall backend the host
  # uses (firewall.nix): nftables lines for networking.firewall.extraInputRules (appended to
  # the input-allow chain), or iptables commands for networking.firewall.extraCommands (run
  # by firewall-start before its final refuse rule; the nixos-fw chain is flushed on every
  # start, so nothing needs removing in extraStopCommands).
  nftAccept = addrs: ports: let
    v4 = lib.filter (a: !isIPv6 a) addrs;
    v6 = lib.filter isIPv6 addrs;
    portSet = "{ ${lib.concatMapStringsSep ", " toString ports} }";
    rule = family: list: lib.optionalString (list != []) "${family} saddr { ${lib.concatStringsSep ", " list} } tcp dport ${portSet} accept\n";
  in
    rule "ip" v4 + rule "ip6" v6;
  iptablesAccept = addrs: ports:
    lib.concatMapStrings (addr:
      lib.concatMapStrings (port: ''
        ${
          if isIPv6 addr
          then "ip6tables"
          else "iptables"
        } -w -A nixos-fw -p tcp -s ${addr} --dport ${toString port} -j nixos-fw-accept
      '')
      ports)
    addrs;
}
