"""A flow-level simulator of DeepSeek-V3's scale-out networks (ISCA'25 "Insights into
DeepSeek-V3", arXiv 2505.09343, §5): topologies as graphs (`topology`), routing and max-min fair
rates (`flows`), workloads and their phases (`workloads`), the paper's comparisons (`report`).
Plain numpy throughout: no graph library, no scipy."""
