"""Federated rounds with Flower: a fleet of virtual devices, the ClientApp, the ServerApp, bundle publishing."""
