"""lorakit.train"""
