"""allspark.runtime"""
