"""The CLI's commands, in groups: each module registers its commands' arguments and holds their functions
(`models`: info, convert, plan; `training`: train, distill, codistill, distill-cache, tokenizer, eval, demo;
`inference`: generate, chat, serve)."""
