"""toolkit.runtime"""
