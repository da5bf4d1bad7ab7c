"""Federated rounds with Flower: a fleet of virtual devices, the ClientApp, the ServerApp, bundle publishing.

Modules by role: what a device runs - :mod:`.client_app` (the Flower ClientApp),
:mod:`.tasks` (gate training, cost curve, distillation on its own log), :mod:`.evaluate`
(decoding held-out prompts); what the server runs - :mod:`.server_app` (the ServerApp and
the guarded FedAvg), :mod:`.guard` (update screening), :mod:`.publish` (versioned bundles);
shared - :mod:`.weights` (the ArrayRecord codec), :mod:`.config`; tooling - :mod:`.fleet`,
:mod:`.centralised`, :mod:`.sweep`, :mod:`.report`, :mod:`.commands`.

    tandem fed fleet --out runs/fleet --devices 8            # logs through a local verifier
    tandem fed run --fleet runs/fleet --out runs/fed --rounds 5 [--hierarchical] [--thresholds global]
    tandem fed run --quick --out runs/fed-quick               # makes a 3-device fleet itself
    tandem fed central --fleet runs/fleet --out runs/central --rounds 5   # the pooled upper bound
    tandem fed sweep --fleet runs/fleet --bundle runs/fed/versions/v0001 --bundle runs/fed/current \
        --thresholds 0.76,0.80,0.84 --match-floor 0.8 --out runs/sweep    # gated cost at equal quality
    python -m tandemspec.federated.fed.report --run fed=runs/fed --run central=runs/central --plot cmp.png
    flwr run . <superlink> --run-config "fleet-dir='runs/fleet' out-dir='runs/fed'"

Set ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` for ``flwr run`` (else it pulls CUDA
torch with uv) and keep the SuperLink connection in ``$FLWR_HOME/config.toml``.
"""
