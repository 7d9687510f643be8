"""The seed's import path: ``from model.modelModule import VQVAEModel``."""
