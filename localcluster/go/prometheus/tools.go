//go:build tools

// Package tools pins the commands this module builds: Prometheus and promtool, used by the
// tests that scrape the operator and check the chart's alerting rules.
package tools

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
