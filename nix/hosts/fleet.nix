# Example hosts of the two multi-host topologies the VM tests run (vm-split: proxy, app,
# data; vm-cluster: a proxy, two app hosts, a three-node RabbitMQ cluster, a database host),
# as flake.nix's nixosConfigurations (`split-proxy`, `cluster-app1`, ...) and deploy-rs nodes
# (flake output `deploy`, nix/deploy.nix). The private addresses, the secret files under
# /run/secrets/pageviews (same content on every host that reads one) and the disk layout
# are placeholders: replace them with the machines' own.
{lib}: let
  domain = "pageviews.example.org";
  secret = name: "/run/secrets/pageviews/${name}";
  passwordFiles = {
    database = lib.genAttrs ["owner" "app" "worker"] (role: secret "db-${role}");
    rabbitmq = lib.genAttrs ["app" "worker"] (who: secret "amqp-${who}");
  };

  # One host: its name and roles, what the topology shares, and the placeholders of a machine.
  host = {
    name,
    address,
    roles,
    network,
    extra ? {},
  }: {
    inherit address;
    module = {
      imports = [extra];
      networking.hostName = name;
      services.pageviews = {
        enable = true;
        inherit roles domain network;
        database.passwordFiles = passwordFiles.database;
        rabbitmq.passwordFiles = passwordFiles.rabbitmq;
        tls = lib.mkIf (lib.elem "proxy" roles) {
          certificateFile = secret "tls-fullchain.pem";
          keyFile = secret "tls-key.pem";
        };
      };
      boot.loader.grub.device = lib.mkDefault "/dev/vda";
      fileSystems."/" = lib.mkDefault {
        device = "/dev/disk/by-label/nixos";
        fsType = "ext4";
      };
      system.stateVersion = "26.05";
    };
  };

  split = let
    a = {
      proxy = "10.0.0.1";
      app = "10.0.0.2";
      data = "10.0.0.3";
    };
    network = {
      appAddress = a.app;
      dataAddress = a.data;
      proxyAddresses = [a.proxy];
    };
  in
    lib.mapAttrs' (role: address:
      lib.nameValuePair "split-${role}" (host {
        name = "split-${role}";
        inherit address network;
        roles = [role];
      }))
    a;

  cluster = let
    a = {
      proxy = "10.0.1.1";
      app1 = "10.0.1.2";
      app2 = "10.0.1.3";
      broker1 = "10.0.1.4";
      broker2 = "10.0.1.5";
      broker3 = "10.0.1.6";
      db = "10.0.1.7";
    };
    brokers = ["broker1" "broker2" "broker3"];
    roleOf = name:
      if name == "db"
      then "data"
      else lib.removeSuffix "1" (lib.removeSuffix "2" (lib.removeSuffix "3" name));
  in
    lib.mapAttrs' (name: address:
      lib.nameValuePair "cluster-${name}" (host {
        name = "cluster-${name}";
        inherit address;
        roles = [(roleOf name)];
        network = {
          appAddress =
            if roleOf name == "app"
            then address
            else null;
          appAddresses = [a.app1 a.app2];
          dataAddress = a.db;
          proxyAddresses = [a.proxy];
        };
        extra.services.pageviews.rabbitmq.cluster = {
          nodes =
            map (b: {
              hostName = "cluster-${b}";
              address = a.${b};
            })
            brokers;
          cookieFile = secret "erlang-cookie";
        };
      }))
    a;
in
  split // cluster
