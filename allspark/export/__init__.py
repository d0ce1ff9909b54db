"""allspark.export"""
