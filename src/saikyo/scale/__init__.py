"""Scale-out engines that serve the same app from many processes (Ray Serve: saikyo.scale.ray)."""
