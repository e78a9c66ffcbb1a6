"""toolkit.server"""
